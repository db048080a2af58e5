"""Seeded, vectorized 64-bit id hashing, stable across processes, platforms and versions.

The mixer is SplitMix64's finalizer (Steele, Lea & Flood, OOPSLA'14) on ``id + (seed + 1) * golden``, written with int64
tensor arithmetic (wrapping multiply, logical shifts by masking), so ids up to 2^63 - 1 hash without overflow
errors and the result does not depend on Python's ``hash()`` randomisation.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash64(ids: torch.Tensor, seed: torch.Tensor | int) -> torch.Tensor:
    """SplitMix64 of ``ids + (seed + 1) * golden``: int64 in, int64 bit patterns out (any sign)."""
    z = ids.to(torch.int64) + (torch.as_tensor(seed, dtype=torch.int64, device=ids.device) + 1) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    return z ^ _shift_right(z, 31)


def hash_to_buckets(ids: torch.Tensor, seed: torch.Tensor | int, buckets: torch.Tensor | int) -> torch.Tensor:
    """Map ids to ``[0, buckets)`` with a seeded hash; ``seed`` and ``buckets`` may be per-id tensors."""
    positive = hash64(ids, seed) & ((1 << 63) - 1)
    return torch.remainder(positive, buckets)


def reference_hash64(value: int, seed: int) -> int:
    """Pure-Python SplitMix64 (unsigned arithmetic), the definition the tensor version is tested against."""
    z = (value + (seed + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _signed(z ^ (z >> 31))


HASHES = ("splitmix64", "identity")


def check_hash_name(method: str, name: str) -> None:
    """A clear error for an unknown ``hash=`` option of a hashing method."""
    if name not in HASHES:
        raise ValueError(f"Method {method!r}: unknown hash {name!r}; use one of {list(HASHES)}.")

"""Seeded, vectorized 64-bit id hashing, stable across processes, platforms and versions.

The mixer is SplitMix64's finalizer (Steele, Lea & Flood, OOPSLA'14) on ``id + (seed + 1) * golden``, written with int64
tensor arithmetic (wrapping multiply, logical shifts by masking), so ids up to 2^63 - 1 hash without overflow
errors and the result does not depend on Python's ``hash()`` randomisation.
"""

from __future__ import annotations

import torch
import torch.fx

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


_POSITIVE = (1 << 63) - 1


def seed_offset(seed: torch.Tensor | int) -> torch.Tensor | int:
    """``(seed + 1) * golden`` wrapped to int64: the constant :func:`hash64` adds to an id before mixing.

    Precompute it once per feature (it only depends on the seed) and hash with :func:`mix_to_buckets`.
    """
    if isinstance(seed, (torch.Tensor, torch.fx.Proxy)):  # a proxy while torch.fx traces a served form
        return (seed.to(torch.int64) + 1) * _GOLDEN  # int64 multiply wraps like the unsigned one
    return _signed((int(seed) + 1) * _GOLDEN)


def _xor_shift_(z: torch.Tensor, bits: int, scratch: torch.Tensor | None) -> torch.Tensor:
    """``z ^= z >>> bits`` in place (logical shift of the int64 bit pattern); returns the scratch buffer."""
    scratch = torch.bitwise_right_shift(z, bits, out=scratch) if scratch is not None else z >> bits
    scratch &= (1 << (64 - bits)) - 1  # torch's ``>>`` is arithmetic: clear the copied sign bits
    z ^= scratch
    return scratch


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer applied in place to an int64 tensor the caller owns; returns the scratch buffer."""
    scratch = _xor_shift_(z, 30, None)
    z *= _MUL1
    _xor_shift_(z, 27, scratch)
    z *= _MUL2
    _xor_shift_(z, 31, scratch)
    return scratch


def hash64(ids: torch.Tensor, seed: torch.Tensor | int) -> torch.Tensor:
    """SplitMix64 of ``ids + (seed + 1) * golden``: int64 in, int64 bit patterns out (any sign)."""
    offset = seed_offset(seed.to(ids.device) if isinstance(seed, torch.Tensor) else seed)
    z = ids.to(torch.int64) + offset  # a fresh tensor: mixed in place below
    _mix_(z)
    return z


def mix_to_buckets(z: torch.Tensor, buckets: torch.Tensor | int) -> torch.Tensor:
    """Finish :func:`hash_to_buckets` from ``z = ids + seed_offset(seed)``; ``z`` is overwritten (pass a temporary).

    Same values as ``hash_to_buckets(ids, seed, buckets)``, with the per-feature seed constants precomputed and
    every step in place (a whole batch hashes with few temporaries). One call in a ``torch.fx`` graph (a leaf: fx
    cannot record the in-place steps).
    """
    return _mixed_to_buckets(z, buckets)


@torch.fx.wrap
def _mixed_to_buckets(z: torch.Tensor, buckets: torch.Tensor | int) -> torch.Tensor:
    """:func:`mix_to_buckets`'s body (``torch.fx.wrap`` patches this module's global, so callers elsewhere trace)."""
    _mix_(z)
    z &= _POSITIVE
    if isinstance(buckets, int) or torch.broadcast_shapes(z.shape, buckets.shape) == z.shape:
        return z.remainder_(buckets)
    return torch.remainder(z, buckets)


def hash_to_buckets(ids: torch.Tensor, seed: torch.Tensor | int, buckets: torch.Tensor | int) -> torch.Tensor:
    """Map ids to ``[0, buckets)`` with a seeded hash; ``seed`` and ``buckets`` may be per-id tensors."""
    offset = seed_offset(seed.to(ids.device) if isinstance(seed, torch.Tensor) else seed)
    return mix_to_buckets(ids.to(torch.int64) + offset, buckets)


def reference_hash64(value: int, seed: int) -> int:
    """Pure-Python SplitMix64 (unsigned arithmetic), the definition the tensor version is tested against."""
    z = (value + (seed + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _signed(z ^ (z >> 31))


def reference_bucket(value: int, seed: int, buckets: int) -> int:
    """Pure-Python :func:`hash_to_buckets` of one id: ``(hash64 & (2^63 - 1)) mod buckets``."""
    return (reference_hash64(value, seed) & _POSITIVE) % buckets


HASHES = ("splitmix64", "identity")


def check_hash_name(method: str, name: str) -> None:
    """A clear error for an unknown ``hash=`` option of a hashing method."""
    if name not in HASHES:
        raise ValueError(f"Method {method!r}: unknown hash {name!r}; use one of {list(HASHES)}.")

"""Product quantisation with codebooks (``dpq``, ``mgqe``): nearest-centroid codes, the straight-through output,
codes packed at their bit width, and centroid usage with re-seeding of dead centroids.

An embedding of dim ``d`` is split into ``D`` parts of ``p = d / D`` values; part ``j`` is replaced by the nearest
of the ``K`` centroids of codebook ``j`` (``(D, K, p)`` per table), so an id is stored as ``D`` codes of
``b = ceil(log2 K)`` bits (Chen et al., ICML'20; Jegou et al., TPAMI'11 for product quantisation)::

    code bytes = ceil(n * D * b / 8)          # n ids, codes packed back to back, little-endian bits
    codebook bytes = D * K * p * 4 = K * d * 4

Codes are exact functions of a query row: distances are accumulated part value by part value in a fixed order
(no matmul, whose blocking may change the rounding with the number of rows), so the codes of an id are the same in
a batch of one, a training batch and the whole table at serving time.

Example::

    codes = nearest_centroids(queries.view(n, D, p), codebook)       # (n, D) int64
    packed = pack_codes(codes, bits=8)                               # uint8, code_bytes(n, D, 8) bytes
    codes_of_ids = unpack_codes(packed, ids, parts=D, bits=8)        # (len(ids), D)
    rows = centroid_rows(codebook, codes_of_ids)                     # (len(ids), d)
    trained = StraightThroughQuantize.apply(queries, codebook, codes)  # training: the queries' gradient
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

#: the widest code a packed buffer holds (a code then spans at most 3 bytes)
MAX_CODE_BITS = 16


def code_bits(num_centroids: int) -> int:
    """Bits of one code into ``num_centroids`` centroids: ``ceil(log2 K)`` (at least 1)."""
    return max(1, math.ceil(math.log2(num_centroids)))


def code_bytes(num_rows: int, parts: int, bits: int) -> int:
    """Bytes of ``num_rows x parts`` codes of ``bits`` bits packed back to back."""
    return -(-num_rows * parts * bits // 8)


def nearest_centroids(
    parts: torch.Tensor, codebook: torch.Tensor, allowed: torch.Tensor | None = None, chunk: int = 16384
) -> torch.Tensor:
    """``(N, D)`` int64: for each row and part of ``parts`` ``(N, D, p)``, the index of the nearest centroid of
    ``codebook`` ``(D, K, p)`` in Euclidean distance (ties: the smallest index). ``allowed`` ``(N,)`` limits row
    ``i`` to the first ``allowed[i]`` centroids (MGQE). Rows go ``chunk`` at a time (``chunk x D x K`` floats)."""
    with torch.no_grad():
        parts, codebook = parts.detach().float(), codebook.detach().float()
        squares = codebook.pow(2).sum(-1)  # (D, K); |q|^2 is the same for every centroid: left out
        out = []
        for start in range(0, max(parts.shape[0], 1), chunk):
            rows = parts[start : start + chunk]
            dot = rows[:, :, 0:1] * codebook[:, :, 0]  # (n, D, K), summed over p in a fixed order
            for j in range(1, codebook.shape[2]):
                dot.addcmul_(rows[:, :, j : j + 1], codebook[:, :, j])
            distance = squares - 2 * dot
            if allowed is not None:
                limit = allowed[start : start + chunk].view(-1, 1, 1)
                distance.masked_fill_(torch.arange(codebook.shape[1], device=limit.device) >= limit, math.inf)
            out.append(distance.argmin(-1))
        return torch.cat(out)


def centroid_rows(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``(N, D * p)``: each row's centroids side by side (differentiable in ``codebook``)."""
    parts = torch.arange(codebook.shape[0], device=codes.device)
    return codebook[parts.unsqueeze(0), codes].flatten(1)


class StraightThroughQuantize(torch.autograd.Function):
    """DPQ-VQ's training output: the value of the chosen centroids ``c``; backward, the queries ``q`` get the
    output's gradient (straight-through) and the codebook gets the gradient of the paper's centroid term
    ``mean((c - sg(q))^2)`` (over this lookup's entries), as if that term were added to the loss. So the codebooks
    train in any training loop, with no extra loss to remember (Chen et al., ICML'20, section 2.2)."""

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        quantized = centroid_rows(codebook, codes)
        ctx.save_for_backward(queries, quantized, codes)
        ctx.codebook_shape = codebook.shape
        return quantized

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        queries, quantized, codes = ctx.saved_tensors
        parts, k, width = ctx.codebook_shape
        pull = (quantized - queries).mul_(2.0 / max(quantized.numel(), 1)).view(-1, parts, width)
        flat = (codes + torch.arange(parts, device=codes.device) * k).reshape(-1)
        grad_codebook = pull.new_zeros(parts * k, width).index_add_(0, flat, pull.reshape(-1, width))
        return grad, grad_codebook.view(parts, k, width), None


def distinct(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids``' distinct values, each id's index among them, and one position of each distinct value in ``ids``."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.zeros_like(unique).scatter_(0, inverse, torch.arange(inverse.numel(), device=ids.device))
    return unique, inverse, first


def pooled(
    rows: dict[int, torch.Tensor], kept: torch.Tensor | None, lengths: torch.Tensor, dims: list[int]
) -> torch.Tensor:
    """``(B, sum(dims))``: feature ``j``'s bags summed from its per-occurrence ``rows[j]`` (``lengths[j]`` ids per
    bag), or, for the features not in ``rows``, their columns of ``kept`` (pooled full tables), in order."""
    out, column = [], 0
    for j, dim in enumerate(dims):
        if j in rows:
            offsets = F.pad(lengths[j].cumsum(0), (1, 0))
            occurrence = torch.arange(rows[j].shape[0], device=rows[j].device)
            out.append(F.embedding_bag(occurrence, rows[j], offsets, mode="sum", include_last_offset=True))
        else:
            out.append(kept[:, column : column + dim])  # type: ignore[index]
            column += dim
    return torch.cat(out, 1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(N, D)`` codes below ``2^bits`` as a uint8 buffer of :func:`code_bytes` bytes: code ``k`` of the flattened
    codes occupies bits ``k*b .. k*b + b - 1`` (byte ``i`` holds bits ``8i .. 8i + 7``, least significant first)."""
    if not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"Codes of {bits} bits cannot be packed: use 1 to {MAX_CODE_BITS} bits per code.")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"Codes must lie in [0, {1 << bits}) to be packed at {bits} bits.")
    size = code_bytes(flat.numel(), 1, bits)
    start = torch.arange(flat.numel(), device=flat.device) * bits
    shifted = flat << (start & 7)  # below 2^(bits + 7) <= 2^23: three bytes
    packed = torch.zeros(size + 2, dtype=torch.int64, device=flat.device)
    for k in range(3):  # the bits of different codes never overlap, so adding is OR-ing
        packed.index_add_(0, (start >> 3) + k, (shifted >> (8 * k)) & 0xFF)
    return packed[:size].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, rows: torch.Tensor, parts: int, bits: int) -> torch.Tensor:
    """``(len(rows), parts)`` int64: the codes of ``rows`` from a buffer of :func:`pack_codes` (static shapes, so it
    traces and exports). Reads the three bytes a code may span; bytes past the end are clamped (bits unused)."""
    last = packed.shape[0] - 1
    start = (rows.to(torch.int64).unsqueeze(1) * parts + torch.arange(parts, device=rows.device)) * bits
    byte = start >> 3
    word = packed[byte.clamp(max=last)].to(torch.int64)
    word = word | (packed[(byte + 1).clamp(max=last)].to(torch.int64) << 8)
    word = word | (packed[(byte + 2).clamp(max=last)].to(torch.int64) << 16)
    return (word >> (start & 7)) & ((1 << bits) - 1)


def centroid_usage(codes: torch.Tensor, num_centroids: int) -> torch.Tensor:
    """``(D, K)`` int64: how many rows of ``codes`` ``(N, D)`` chose each centroid of each part."""
    parts = codes.shape[1]
    offsets = torch.arange(parts, device=codes.device) * num_centroids
    counts = torch.bincount((codes + offsets).reshape(-1), minlength=parts * num_centroids)
    return counts.view(parts, num_centroids)


def codebook_from_rows(rows: torch.Tensor, parts: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(D, K, p)``: ``K`` rows of ``rows`` ``(n, D * p)`` as centroids, every row first when ``K >= n`` (then random
    repeats), so each centroid starts where queries are."""
    n = rows.shape[0]
    ids = torch.randperm(n, generator=generator)[:k]
    ids = torch.cat([ids, torch.randint(0, n, (k - ids.numel(),), generator=generator)]).to(rows.device)
    return rows.detach()[ids].float().view(k, parts, -1).transpose(0, 1)


def reseed_dead(
    codebook: torch.Tensor, usage: torch.Tensor, queries: torch.Tensor | None, generator: torch.Generator
) -> int:
    """Move every centroid that ``usage`` ``(D, K)`` says no row chose onto a random recent query part (``queries``
    ``(N, D, p)``), the usual remedy for codebook collapse (dead codes restarted from the data, e.g. Dhariwal et al.,
    arXiv 2005.00341). Returns the number of centroids moved. With several processes the usage is summed over the
    ranks first and every rank then takes rank 0's codebook, so replicas stay equal."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(usage)
    dead = (usage == 0).nonzero(as_tuple=True)
    moved = 0
    if dead[0].numel() and queries is not None and queries.shape[0]:
        pick = torch.randint(0, queries.shape[0], (dead[0].numel(),), generator=generator).to(queries.device)
        with torch.no_grad():
            codebook[dead] = queries[pick, dead[0]].to(codebook.dtype)
        moved = int(dead[0].numel())
    if distributed:
        dist.broadcast(codebook, src=0)
    return moved

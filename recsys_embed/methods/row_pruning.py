"""Row pruning by learnt thresholds (OptEmbed, ``optembed.py``): the straight-through step, the served bytes of
pruned tables, the rows a byte budget keeps, and the remap of ids onto kept rows.

A pruned table serves its kept rows (at a dim ``d <= d_t``) plus their sorted ids as int32, none when every row is
kept; a pruned id gives a zero vector::

    bytes = kept * d * 4 + (kept < n) * 4 * kept

Example::

    mask = StraightThroughStep.apply(rows.abs().sum(1) - threshold)  # 1 keeps a row, 0 prunes it
    masks = MarginRanking(margins).keep(dims, target_bytes=10_000)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchrec import EmbeddingBagConfig

from recsys_embed.methods.tables import FP32_BYTES

INT32_BYTES = 4


class StraightThroughStep(torch.autograd.Function):
    """``x > 0`` forward; backward OptEmbed's straight-through estimate of the step's slope (Lyu et al., CIKM'22):
    ``2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` up to ``|x| = 1``, 0 beyond."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        a = x.abs()
        slope = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, torch.full_like(a, 0.4), torch.zeros_like(a)))
        return grad * slope


def initial_rows(table: EmbeddingBagConfig, seed: int, index: int) -> torch.Tensor:
    """Table number ``index``'s rows at initialisation (TorchRec's uniform init, ``±sqrt(1/n)``), regenerated from
    ``seed`` on the CPU: pruning methods rewind to them instead of storing a copy."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    bound = math.sqrt(1.0 / table.num_embeddings)
    return (torch.rand(table.num_embeddings, table.embedding_dim, generator=g) * 2 - 1).mul_(bound)


def served_bytes(tables: Sequence[EmbeddingBagConfig], kept: Sequence[int], dims: Sequence[int]) -> int:
    """Bytes of pruned tables (the module docstring's formula), ``kept[t]`` rows of table ``t`` at ``dims[t]``."""
    return sum(
        k * d * FP32_BYTES + (INT32_BYTES * k if k < t.num_embeddings else 0) for t, k, d in zip(tables, kept, dims)
    )


class MarginRanking:
    """Every row of every table ranked once by its margin (e.g. ``|e|_1 - t_f``), to answer for many ``dims``: which
    rows to keep, i.e. margin above 0 and, with a ``target_bytes``, the largest margins (over every table: one
    raised threshold) whose rows at ``dims`` plus their int32 ids fit. Rows tied with the first row left out are left
    out too, so the result never exceeds the budget."""

    def __init__(self, margins: Sequence[torch.Tensor]) -> None:
        self.margins = list(margins)
        flat = torch.cat(self.margins)
        self.order = flat.argsort(descending=True)
        self.sorted = flat[self.order]
        sizes = torch.tensor([m.numel() for m in self.margins], device=flat.device)
        self.table_of = torch.repeat_interleave(torch.arange(len(self.margins), device=flat.device), sizes)[self.order]

    def keep(self, dims: Sequence[int], target_bytes: int | None) -> list[torch.Tensor]:
        masks = [m > 0 for m in self.margins]
        if target_bytes is None:
            return masks
        per_row = torch.tensor([d * FP32_BYTES + INT32_BYTES for d in dims], dtype=torch.float64)
        cost = per_row.to(self.sorted.device)[self.table_of].cumsum(0)
        fits = int(torch.searchsorted(cost, torch.tensor(float(target_bytes), dtype=torch.float64), right=True))
        if fits >= self.sorted.numel():
            return masks
        cut = self.sorted[fits]  # the first row left out
        return [keep & (m > cut) for keep, m in zip(masks, self.margins)]


def kept_positions(kept_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each id's row among the sorted ``kept_ids`` (any kept row for a pruned id) and whether it is kept (1/0)."""
    kept = kept_ids.to(torch.int64)
    pos = torch.searchsorted(kept, ids).clamp(max=kept.numel() - 1)
    return pos, (kept[pos] == ids).to(torch.float32)

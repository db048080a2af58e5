"""``alpt``: adaptive low-precision training, integer rows whose step sizes are learnt (per row or per table).

Idea (Li et al., AAAI'23, "Adaptive Low-Precision Training for Embeddings in Click-Through Rate Prediction", arXiv
2212.05735): rows are stored as ``b``-bit integers ``q`` with a learnable step size ``Δ`` (one per row, or one per
table), read as ``q * Δ``. Each step updates the weights and the step sizes alternately: (1) the row gradient ``g``
gives fp32 rows ``w = q * Δ - update(g)`` (row-wise Adagrad); (2) ``Δ`` takes a step along the LSQ gradient (Esser et
al., ICLR'20) of the loss at ``Q(w; Δ) = clamp(round(w / Δ)) * Δ``, i.e. ``sum g * ∂Q/∂Δ`` with ``∂Q/∂Δ = round(w/Δ)
- w/Δ`` inside the range and the clamp bound outside, scaled by ``1 / sqrt(values per Δ * 2^(b-1))``; (3) the rows
are written back as ``stochastic_round(w / Δ_new)``. The paper evaluates the loss of step (2) in a second forward
pass; here ``g`` (from the same backward) stands in for it, so a step costs one forward and backward, like every
other method. Updates happen inside backward (:mod:`~recsys_embed.methods.low_precision`); ``Δ`` starts at
``clip / 2^(b-1)`` and trains with Adagrad at ``step_lr`` times that initial step (a relative rate, so 8 and 16 bits
take the same option). The paper's headline: 8-bit embeddings without loss of
accuracy against fp32.

Memory: ``sum_t (n_t * d_t * bits / 8 + 4 * (n_t if step_size == "row" else 1))`` bytes: the integer rows and the
fp32 step sizes (3.2x at dim 16 and 8 bits per row, 4x minus 4 bytes per table with one step per table). A budget
picks the most bits that fit at the given ``step_size``. Optimizer accumulators are training state, not counted;
the served form holds rows and step sizes only and gives the trained form's eval outputs exactly.

Example::

    emb = build_embedding("alpt", tables, budget=Budget(ratio=3))  # 8 bits, one step size per row
    emb = build_embedding("alpt", tables, bits=8, step_size="table")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torchrec import EmbeddingBagConfig

from recsys_embed.methods.base import FP32_BYTES, Budget, check_tables, full_bytes
from recsys_embed.methods.low_precision import (
    LowPrecisionMethod,
    adagrad_step,
    check_low_precision,
    dequantise,
    int_range,
    quantise,
)
from recsys_embed.methods.registry import register

#: the smallest step size (keeps every Δ positive)
MIN_STEP = 1e-8


def alpt_bytes(tables: Sequence[EmbeddingBagConfig], bits: int, step_size: str) -> int:
    """Integer rows plus fp32 step sizes: ``sum_t n_t * d_t * bits / 8 + 4 * (n_t or 1)``."""
    steps = sum(t.num_embeddings if step_size == "row" else 1 for t in tables)
    return sum(t.num_embeddings * t.embedding_dim for t in tables) * bits // 8 + FP32_BYTES * steps


def lsq_step_gradient(w: torch.Tensor, step: torch.Tensor, grad: torch.Tensor, bits: int) -> torch.Tensor:
    """``grad * ∂Q(w; Δ)/∂Δ`` per entry (LSQ): ``round(w/Δ) - w/Δ`` inside the integer range, the bound outside."""
    low, high = int_range(bits)
    scaled = w / step
    inside = torch.round(scaled) - scaled
    return grad * torch.where(scaled < low, float(low), torch.where(scaled > high, float(high), inside))


@register("alpt")
class ALPTEmbedding(LowPrecisionMethod):
    """ALPT: integer rows with learnt step sizes, weights and step sizes updated alternately."""

    budget_knobs = ("bits",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        bits: int = 8,
        step_size: Literal["row", "table"] = "row",
        clip: float = 1.0,
        step_lr: float = 0.01,
        rows_optimizer: Literal["sgd", "rowwise_adagrad"] = "rowwise_adagrad",
        rows_lr: float = 0.05,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        check_low_precision(self.name, bits, clip, rows_optimizer, rows_lr)
        if step_size not in ("row", "table") or not step_lr > 0:
            raise ValueError(
                f"Method 'alpt': step_size must be 'row' or 'table' and step_lr positive (got {step_size!r}, "
                f"{step_lr})."
            )
        self.bits, self.step_size, self.step_lr = bits, step_size, step_lr
        self.rows_optimizer, self.rows_lr = rows_optimizer, rows_lr
        initial = clip / 2 ** (bits - 1)
        self.step_lr_absolute = step_lr * initial  # Adagrad's lr for the step sizes
        self._build_rows(bits, [initial] * len(self._tables), rows_optimizer, seed, device)
        self.steps = nn.Module()  # learnt step sizes: (n, 1) per row or (1, 1) per table, stored and served
        for i, t in enumerate(self._tables):
            count = t.num_embeddings if step_size == "row" else 1
            self.steps.register_buffer(f"t{i}", torch.full((count, 1), initial, device=self.device))
            self.optimizer_state.register_buffer(f"step{i}", torch.zeros(count, device=self.device))

    def table_steps(self, i: int) -> torch.Tensor:
        return getattr(self.steps, f"t{i}")

    def step(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        steps = self.table_steps(i)
        return steps[ids] if self.step_size == "row" else steps

    def update_rows(self, i: int, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """(1) fp32 weight step, (2) LSQ step-size step, (3) rows written back with the new step sizes."""
        rows, steps = self.table_rows(i), self.table_steps(i)
        step = self.step(i, ids)
        updated = dequantise(rows[ids], step) - adagrad_step(grad, self.accumulator(f"t{i}"), ids, self.rows_lr)
        per_entry = lsq_step_gradient(updated, step, grad, self.bits)
        if self.step_size == "row":
            step_ids = ids
            step_grad = per_entry.sum(1, keepdim=True) / math.sqrt(grad.shape[1] * int_range(self.bits)[1])
        else:
            step_ids = torch.zeros(1, dtype=torch.long, device=ids.device)
            step_grad = per_entry.sum().view(1, 1) / math.sqrt(per_entry.numel() * int_range(self.bits)[1])
        change = adagrad_step(step_grad, self.optimizer_state.get_buffer(f"step{i}"), step_ids, self.step_lr_absolute)
        steps[step_ids] = (steps[step_ids] - change).clamp_(min=MIN_STEP)
        rows[ids] = quantise(updated, self.step(i, ids), self.bits, stochastic=True)

    def memory_bytes(self) -> int:
        return alpt_bytes(self._tables, self.bits, self.step_size)

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> ALPTEmbedding:
        """16 bits if they fit the budget, else 8 bits (at the given ``step_size``); else an error."""
        tables = check_tables(tables)
        allowed = budget.max_bytes(tables)
        step_size = str(cls.with_defaults(options)["step_size"])
        fitting = [bits for bits in (16, 8) if alpt_bytes(tables, bits, step_size) <= allowed]
        if not fitting:
            smallest = alpt_bytes(tables, 8, step_size)
            raise ValueError(
                f"Method 'alpt' cannot fit {allowed} bytes (ratio {full_bytes(tables) / allowed:.1f}): at 8 bits with "
                f"one step size per {step_size} it stores {smallest} bytes (ratio {full_bytes(tables) / smallest:.2f})"
                f". Ask for at least {smallest} bytes"
                + (", or use step_size='table' (about 4x)" if step_size == "row" else "")
                + ", or use another method."
            )
        return cls(tables, bits=fitting[0], **options)  # type: ignore[arg-type]

"""``quant``: fixed-point rows, INT8 or INT16 with a fixed step per table, updated with stochastic rounding.

Idea (Xu et al., SIGMOD'21, "Agile and Accurate CTR Prediction Model Training for Massive-Scale Online Advertising
Systems", as the INT8/INT16 method of the VLDB'24 embedding compression benchmark, Zhang et al., arXiv 2311.15578):
every row is stored at ``bits`` = 8 or 16 bits, value ``q * s`` with a fixed step ``s = clip / 2^(bits-1)`` per
table (``clip`` is the largest magnitude a value can take). The forward dequantises the rows it reads; in backward
the optimizer step (row-wise Adagrad, ``rows_lr``) is computed in fp32 on the dequantised rows and written back
with stochastic rounding, so small updates survive in expectation
(:mod:`~recsys_embed.methods.low_precision`).

Memory: ``sum_t n_t * d_t * bits / 8`` bytes: the integer rows; the step is ``clip / 2^(bits-1)``, a constant of the
config like a layout's bases (not stored, as the README's memory definition says of such constants). So the
ratio is exactly 4 (8 bits) or 2 (16 bits); a budget picks the most bits that fit, and a budget under a quarter
of the full tables is an error. Optimizer accumulators (one fp32 per row) are training state, not counted. The
served form is the integer rows alone (:meth:`to_serving`), giving the trained form's eval outputs exactly.

Example::

    emb = build_embedding("quant", tables, budget=Budget(ratio=4))  # 8 bits
    emb = build_embedding("quant", tables, bits=16, clip=0.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchrec import EmbeddingBagConfig

from recsys_embed.methods.base import Budget, check_tables, full_bytes
from recsys_embed.methods.low_precision import (
    LowPrecisionMethod,
    adagrad_step,
    check_low_precision,
    dequantise,
    quantise,
)
from recsys_embed.methods.registry import register


def quant_bytes(tables: Sequence[EmbeddingBagConfig], bits: int) -> int:
    """The integer rows' bytes: ``sum_t n_t * d_t * bits / 8``."""
    return sum(t.num_embeddings * t.embedding_dim for t in tables) * bits // 8


@register("quant")
class QuantEmbedding(LowPrecisionMethod):
    """INT8/INT16 fixed-point rows with a fixed per-table step, trained with stochastic rounding."""

    budget_knobs = ("bits",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        bits: int = 8,
        clip: float = 1.0,
        rows_optimizer: Literal["sgd", "rowwise_adagrad"] = "rowwise_adagrad",
        rows_lr: float = 0.05,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        check_low_precision(self.name, bits, clip, rows_optimizer, rows_lr)
        self.bits, self.clip, self.rows_optimizer, self.rows_lr = bits, clip, rows_optimizer, rows_lr
        self.fixed_step = clip / 2 ** (bits - 1)
        self._build_rows(bits, [self.fixed_step] * len(self._tables), rows_optimizer, seed, device)

    def step(self, i: int, ids: torch.Tensor) -> float:
        return self.fixed_step

    def update_rows(self, i: int, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """fp32 step on the dequantised rows, written back with stochastic rounding."""
        rows = self.table_rows(i)
        change = adagrad_step(grad, self.accumulator(f"t{i}"), ids, self.rows_lr)
        updated = dequantise(rows[ids], self.fixed_step) - change
        rows[ids] = quantise(updated, self.fixed_step, self.bits, stochastic=True)

    def memory_bytes(self) -> int:
        return quant_bytes(self._tables, self.bits)

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> QuantEmbedding:
        """16 bits if they fit the budget, else 8 bits; an error below a quarter of the full tables."""
        tables = check_tables(tables)
        allowed = budget.max_bytes(tables)
        fitting = [bits for bits in (16, 8) if quant_bytes(tables, bits) <= allowed]
        if not fitting:
            raise ValueError(
                f"Method 'quant' cannot fit {allowed} bytes (ratio {full_bytes(tables) / allowed:.1f}): it stores "
                f"every value at 8 or 16 bits, i.e. ratio 4 ({quant_bytes(tables, 8)} bytes) or 2 "
                f"({quant_bytes(tables, 16)} bytes). Ask for a ratio of at most 4, or use another method."
            )
        return cls(tables, bits=fitting[0], **options)  # type: ignore[arg-type]

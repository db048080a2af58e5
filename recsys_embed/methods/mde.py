"""``mde``: mixed-dimension embeddings: big (rarely repeated) tables get narrow rows, projected back to ``d``.

Idea (Ginart et al., ISIT'21, "Mixed Dimension Embeddings with Application to Memory-Efficient Recommendation
Systems"): give a table a dim proportional to its popularity to the power ``alpha``; with uniform popularity
inside a table (``p = 1 / n``) that is ``d_t = d * (n_t / n_min)^-alpha``, rounded to a multiple of 4 (fbgemm's
kernels need it) and clipped to ``[4, d]``. A
table with ``d_t < d`` is followed by a learned ``d_t x d`` projection, so every feature still outputs ``d``
(pooling is linear, so projecting the pooled bag equals pooling the projected rows). The tables stay TorchRec tables
of their own width; the projections are small dense parameters.

Memory: ``sum_t n_t * d_t * 4 + sum_{t: d_t < d} d_t * d * 4`` bytes. The budget solver searches ``alpha``.

Example::

    emb = build_embedding("mde", tables, budget=Budget(ratio=10))
    emb = build_embedding("mde", tables, alpha=0.3)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import FP32_BYTES, TBE_DIM_MULTIPLE, Budget, EmbeddingMethod, check_tables, full_bytes
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import keyed

log = logging.getLogger(__name__)


def mixed_dims(tables: Sequence[EmbeddingBagConfig], alpha: float) -> list[int]:
    """``d_t * (n_t / n_min)^-alpha`` rounded to a multiple of 4 (fbgemm's need) and clipped to ``[4, d_t]``."""
    smallest = min(t.num_embeddings for t in tables)
    q = TBE_DIM_MULTIPLE
    return [
        max(
            min(q, t.embedding_dim),
            min(t.embedding_dim, q * round(t.embedding_dim * (t.num_embeddings / smallest) ** -alpha / q)),
        )
        for t in tables
    ]


def mde_bytes(tables: Sequence[EmbeddingBagConfig], dims: Sequence[int]) -> int:
    """The memory formula: narrow tables plus projections."""
    return FP32_BYTES * sum(
        t.num_embeddings * d + (d * t.embedding_dim if d < t.embedding_dim else 0) for t, d in zip(tables, dims)
    )


@register("mde")
class MixedDimEmbedding(EmbeddingMethod):
    """Per-table dims ``d * (n / n_min)^-alpha`` with a projection back to ``d``."""

    budget_knobs = ("alpha", "dims")

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        alpha: float = 0.3,
        dims: Sequence[int] | None = None,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        if alpha < 0:
            raise ValueError(f"Method 'mde' needs alpha >= 0 (got {alpha}).")
        self.dims = list(dims) if dims is not None else mixed_dims(self._tables, alpha)
        if len(self.dims) != len(self._tables) or any(
            not 1 <= d <= t.embedding_dim or d % TBE_DIM_MULTIPLE for d, t in zip(self.dims, self._tables)
        ):
            raise ValueError(
                f"Method 'mde': dims must give one value per table in [4, embedding_dim], a multiple of "
                f"{TBE_DIM_MULTIPLE} for fbgemm (got {dims})."
            )
        self.alpha = alpha
        dev = torch.device(device or "cpu")
        physical = [replace(t, embedding_dim=d) for t, d in zip(self._tables, self.dims)]
        self.tables = self.add_tables("tables", physical, device=dev)
        self.projections = nn.ModuleDict(
            {
                t.name: nn.Linear(d, t.embedding_dim, bias=False, device=dev)
                for t, d in zip(self._tables, self.dims)
                if d < t.embedding_dim
            }
        )
        with torch.no_grad():  # keep the projected rows at a full table's scale
            for t, d in zip(self._tables, self.dims):
                if t.name in self.projections:
                    self.projections[t.name].weight.normal_(0.0, 1.0 / math.sqrt(d))
        self._split = [d for t, d in zip(self._tables, self.dims) for _ in t.feature_names]
        self._projection_of = [self._table_of[f] for f in self._feature_names]

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.tables(features).values()
        parts = torch.split(pooled, self._split, dim=1)  # indexed, not iterated: an fx proxy has no length
        out = [
            self.projections[name](parts[i]) if name in self.projections else parts[i]
            for i, name in enumerate(self._projection_of)
        ]
        return keyed(torch.cat(out, dim=1), self._feature_names, self._length_per_key)

    def memory_bytes(self) -> int:
        return mde_bytes(self._tables, self.dims)

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> MixedDimEmbedding:
        tables = check_tables(tables)
        allowed = budget.max_bytes(tables)
        if mde_bytes(tables, mixed_dims(tables, 0.0)) <= allowed:
            return cls(tables, alpha=0.0, **options)  # type: ignore[arg-type]
        high = 1.0
        while mde_bytes(tables, mixed_dims(tables, high)) > allowed and high < 64:
            high *= 2
        smallest = mde_bytes(tables, mixed_dims(tables, high))
        if smallest > allowed:
            raise ValueError(
                f"Method 'mde' cannot fit {allowed} bytes: with every dim shrunk to 4 it needs {smallest} bytes "
                f"(ratio {full_bytes(tables) / smallest:.1f}); the smallest table keeps its full dim. "
                f"Ask for at least {smallest} bytes."
            )
        low = 0.0
        for _ in range(40):  # bytes fall as alpha grows: bisect for the smallest alpha that fits
            mid = (low + high) / 2
            low, high = (mid, high) if mde_bytes(tables, mixed_dims(tables, mid)) > allowed else (low, mid)
        method = cls(tables, alpha=high, **options)  # type: ignore[arg-type]
        log.info(
            "mde: alpha=%.4f dims %s reach ratio %.2f (asked %s)", high, method.dims, method.compression_ratio(), budget
        )
        return method

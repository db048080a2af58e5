"""``mde``: mixed-dimension embeddings: big (rarely repeated) tables get narrow rows, projected back to ``d``.

Idea (Ginart et al., ISIT'21, "Mixed Dimension Embeddings with Application to Memory-Efficient Recommendation
Systems"): give a table a dim proportional to its popularity to the power ``alpha``; with uniform popularity
inside a table (``p = 1 / n``) that is ``d_t = d * (n_t / n_min)^-alpha``, rounded to a multiple of 4 (fbgemm's
kernels need it) and clipped to ``[4, d]``. A
table with ``d_t < d`` is followed by a learned ``d_t x d`` projection, so every feature still outputs ``d``
(pooling is linear, so projecting the pooled bag equals pooling the projected rows). The tables stay TorchRec tables
of their own width; the projections are small dense parameters.

Memory: ``sum_t n_t * d_t * 4 + sum_{t: d_t < d} d_t * d * 4`` bytes.

Budget solver: the smallest ``alpha`` whose dims fit, found exactly: dims only change at finitely many ``alpha``
(:func:`alpha_breakpoints`), and every interval between them is tried in order, because bytes need not fall as
``alpha`` grows (a dim just below ``d`` costs more than the full table when ``n < d(d - 4) / 4``: tables
``(10, 500)`` at ``d = 64`` take 130,560 bytes at ``alpha = 0`` and 137,920 at ``0.01``). A table whose narrow form
plus projection is no smaller than its full rows keeps its full dim (:func:`without_wasted_projections`). When no
``alpha`` fits (all but the most popular tables already at dim 4), the widest dims are capped together, down to the
true ceiling: every table at dim 4 (or full, where that is smaller). The solved ``dims`` are passed explicitly.

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
from recsys_embed.methods.layouts import keyed
from recsys_embed.methods.registry import register

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


def without_wasted_projections(tables: Sequence[EmbeddingBagConfig], dims: Sequence[int]) -> list[int]:
    """``dims`` with every table whose narrow rows plus projection (``(n + d) * d_t``) take no fewer bytes than its
    full rows (``n * d``) put back at full dim: same or fewer bytes, no projection, no information lost.

    For ``d_t < d`` the narrow form wins only when ``n > d * d_t / (d - d_t)``, so small tables (``n < d(d - 4) / 4``
    for ``d_t`` just below ``d``) are better left full; this is why bytes need not fall as ``alpha`` grows.
    """
    return [
        t.embedding_dim
        if d < t.embedding_dim and (t.num_embeddings + t.embedding_dim) * d >= t.num_embeddings * t.embedding_dim
        else d
        for t, d in zip(tables, dims)
    ]


def alpha_breakpoints(tables: Sequence[EmbeddingBagConfig]) -> list[float]:
    """The ``alpha > 0`` at which some table's :func:`mixed_dims` dim changes (its unrounded dim crosses an odd
    multiple of 2), increasing; the dims are constant between two of them."""
    smallest, q = min(t.num_embeddings for t in tables), TBE_DIM_MULTIPLE
    points = {
        math.log(t.embedding_dim / (q * (m + 0.5))) / math.log(t.num_embeddings / smallest)
        for t in tables
        if t.num_embeddings > smallest
        for m in range(t.embedding_dim // q)
        if q * (m + 0.5) < t.embedding_dim
    }
    return sorted(points)


def smallest_mde_bytes(tables: Sequence[EmbeddingBagConfig]) -> int:
    """The fewest bytes any per-table dims reach: each table at dim 4 with its projection, or full if smaller."""
    return mde_bytes(
        tables, without_wasted_projections(tables, [min(TBE_DIM_MULTIPLE, t.embedding_dim) for t in tables])
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
        if len(self.dims) != len(self._tables):
            raise ValueError(f"Method 'mde': dims must give one value per table ({len(self._tables)}), got {dims}.")
        for d, t in zip(self.dims, self._tables):
            if not 1 <= d <= t.embedding_dim or d % TBE_DIM_MULTIPLE:
                source = "dims" if dims is not None else f"alpha={alpha}"
                raise ValueError(
                    f"Method 'mde': table {t.name!r} gets dim {d} from {source}, but each dim must be in "
                    f"[{TBE_DIM_MULTIPLE}, {t.embedding_dim}] and a multiple of {TBE_DIM_MULTIPLE} (fbgemm's kernels); "
                    f"give embedding_dim a multiple of {TBE_DIM_MULTIPLE} or explicit dims=[...]."
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
        """The smallest ``alpha`` whose dims fit (exact: every interval between breakpoints is tried, no
        monotonicity assumed), then a common cap on the widest dims; wasted projections are dropped."""
        tables = check_tables(tables)
        allowed, full = budget.max_bytes(tables), full_bytes(tables)
        points = alpha_breakpoints(tables)
        # each breakpoint, and just past it (the dims of the interval it opens)
        candidates = [0.0] + [a + step for a in points for step in (0.0, 1e-9 * max(1.0, a))]
        for alpha in candidates:
            dims = without_wasted_projections(tables, mixed_dims(tables, alpha))
            if mde_bytes(tables, dims) <= allowed:
                return cls._solved(tables, alpha, dims, budget, options)
        # past the last breakpoint every table but the most popular is at dim 4: narrow those too, to a common cap
        alpha = (points[-1] if points else 0.0) + 1.0
        family = mixed_dims(tables, alpha)
        for cap in range(max(family) - TBE_DIM_MULTIPLE, 0, -TBE_DIM_MULTIPLE):
            dims = without_wasted_projections(tables, [min(d, max(cap, min(TBE_DIM_MULTIPLE, d))) for d in family])
            if mde_bytes(tables, dims) <= allowed:
                return cls._solved(tables, alpha, dims, budget, options)
        smallest = smallest_mde_bytes(tables)
        raise ValueError(
            f"Method 'mde' cannot fit {allowed} bytes (ratio {full / allowed:.1f}): the fewest bytes any per-table "
            f"dims reach is {smallest} bytes (ratio {full / smallest:.1f}: every table at dim 4 with its projection, "
            f"or full where that is smaller). Ask for at least {smallest} bytes, or use a method whose rows are "
            "shared (e.g. 'qr' or 'hash')."
        )

    @classmethod
    def _solved(
        cls,
        tables: list[EmbeddingBagConfig],
        alpha: float,
        dims: list[int],
        budget: Budget,
        options: dict[str, object],
    ) -> MixedDimEmbedding:
        method = cls(tables, **{**options, "alpha": alpha, "dims": dims})  # type: ignore[arg-type]
        log.info("mde: alpha=%.4f dims %s reach ratio %.2f (asked %s)", alpha, dims, method.compression_ratio(), budget)
        return method

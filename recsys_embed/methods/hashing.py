"""``hash``: the hashing trick, each large table folded onto ``rows`` hashed rows.

Idea (Weinberger et al., ICML'09, "Feature hashing for large scale multitask learning"): id ``x`` of a table
with ``n`` ids reads row ``h_t(x) mod m`` of a table of ``m = min(n, rows)`` rows, with a seeded per-table hash
``h_t``. Tables with ``n <= rows`` keep one row per id (no hashing, no collision). With ``shared=True`` all
features share one table of ``rows`` rows, each with its own seed (all dims must be equal).

Memory: ``sum_t min(n_t, rows) * d_t * 4 + 8 * #tables`` bytes (rows plus one int64 seed per logical table, so
features of one table hash alike), or ``rows * d * 4 + 8 * #tables`` when shared. The budget solver picks the
largest ``rows`` that fits.

Ids of hashed tables may be any int64 >= 0 (also above the declared cardinality): hashing wraps them by
definition. Tables kept full still reject ids outside ``[0, n)``, except with ``hash="identity"``, which wraps
every table's ids (``id mod m``, also for tables kept full).

Example::

    emb = build_embedding("hash", tables, budget=Budget(ratio=10))
    emb = build_embedding("hash", tables, rows=100_000, seed=1)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods.base import FP32_BYTES, INT64_BYTES, Budget, check_tables, full_bytes
from recsys_embed.methods.hash_fn import check_hash_name, mix_to_buckets, reference_bucket, seed_offset
from recsys_embed.methods.layouts import IdLayout
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import RemapMethod
from recsys_embed.methods.solvers import largest_fitting

log = logging.getLogger(__name__)
BAGS = "shared@bags"  # the shared table's one physical feature (fbgemm's fast backward needs one feature per table)


@register("hash")
class HashEmbedding(RemapMethod):
    """Hashing trick: ``min(n, rows)`` rows per table (or one shared table of ``rows`` rows)."""

    budget_knobs = ("rows",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        rows: int,
        shared: bool = False,
        hash: Literal["splitmix64", "identity"] = "splitmix64",
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        if rows < 1:
            raise ValueError(f"Method 'hash' needs rows >= 1 (got {rows}).")
        check_hash_name("hash", hash)
        self.rows, self.shared, self.hash_name = rows, shared, hash
        self.declare_remap([1] * len(self._feature_names), shared=BAGS if shared else None)
        if shared:
            dims = {t.embedding_dim for t in self._tables}
            if len(dims) > 1:
                raise ValueError(
                    f"Method 'hash' with shared=True needs one embedding_dim for all tables (got {sorted(dims)}); "
                    "use shared=False or equal dims."
                )
            physical = [
                EmbeddingBagConfig(name="shared", num_embeddings=rows, embedding_dim=dims.pop(), feature_names=[BAGS])
            ]
            buckets = [rows] * len(self._feature_names)
            hashed = [True] * len(self._feature_names)
        else:
            physical = [replace(t, num_embeddings=min(t.num_embeddings, rows)) for t in self._tables]
            per_table = {t.name: (min(t.num_embeddings, rows), t.num_embeddings > rows) for t in self._tables}
            buckets = [per_table[self._table_of[f]][0] for f in self._feature_names]
            hashed = [per_table[self._table_of[f]][1] for f in self._feature_names]
        dev = torch.device(device or "cpu")
        wraps = [h or hash == "identity" for h in hashed]  # identity is ``id mod m`` on every table
        self.unbounded_features = {f for f, w in zip(self._feature_names, wraps) if w}
        seeds = [seed * 1_000_003 + i for i in range(len(self._tables))]  # per logical table: its features agree
        self.register_buffer("seeds", torch.tensor(seeds, dtype=torch.int64, device=dev))
        self.register_buffer("feature_table", torch.tensor(self._table_index, device=dev), persistent=False)
        self.register_buffer("buckets", torch.tensor(buckets, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("hashed", torch.tensor(hashed, dtype=torch.bool, device=dev), persistent=False)
        self._hashed_index = [f for f, h in enumerate(hashed) if h]
        self._buckets, self._hashed = buckets, hashed
        self.tables = self.add_tables("tables", physical, device=dev)

    def id_map(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Hashed features: ``hash_t(x) mod rows``; tables kept full: ``x``; identity: ``x mod m``."""
        if self.hash_name == "identity":
            layout = IdLayout(features)
            rows = layout.flat(torch.remainder(layout.ids, layout.spread(self.buckets)))
        else:  # every hashed feature folds onto ``rows`` rows (``min(n, rows)`` with ``n > rows``, or shared)
            layout = IdLayout(features, self._hashed_index)
            offsets = layout.spread(seed_offset(self.seeds[self.feature_table]))
            rows = layout.merge(mix_to_buckets(layout.ids + offsets, self.rows), self.hashed)
        return rows.unsqueeze(0)

    def reference_rows(self, feature: str, id: int) -> list[int]:
        f = self._feature_names.index(feature)
        if self.hash_name == "identity":
            return [id % self._buckets[f]]
        if not self._hashed[f]:
            return [id]
        return [reference_bucket(id, int(self.seeds[self._table_index[f]]), self.rows)]

    def memory_bytes(self) -> int:
        return self.rows_bytes(self._tables, self.rows, self.shared)

    @staticmethod
    def rows_bytes(tables: Sequence[EmbeddingBagConfig], rows: int, shared: bool) -> int:
        """The memory formula for a given ``rows`` (used by the budget solver)."""
        seeds = INT64_BYTES * len(tables)
        if shared:
            return rows * tables[0].embedding_dim * FP32_BYTES + seeds
        return sum(min(t.num_embeddings, rows) * t.embedding_dim * FP32_BYTES for t in tables) + seeds

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> HashEmbedding:
        tables = check_tables(tables)
        shared = bool(cls.with_defaults(options)["shared"])
        allowed = budget.max_bytes(tables)
        if cls.rows_bytes(tables, 1, shared) > allowed:
            smallest = cls.rows_bytes(tables, 1, shared)
            raise ValueError(
                f"Method 'hash' cannot fit {allowed} bytes: one row per table already needs {smallest} bytes "
                f"(ratio {full_bytes(tables) / smallest:.1f}). Ask for a budget of at least {smallest} bytes."
            )
        most = max(t.num_embeddings for t in tables) * (len(tables) if shared else 1)
        rows = largest_fitting(lambda r: cls.rows_bytes(tables, r, shared) <= allowed, 1, most)
        method = cls(tables, rows=rows, **options)  # type: ignore[arg-type]
        log.info("hash: rows=%d reaches ratio %.2f (asked %s)", rows, method.compression_ratio(), budget)
        return method

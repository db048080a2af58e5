"""``multi_hash``: ``k`` independently seeded hashes into ``m`` rows per table, summed.

Idea (hash embeddings, Svenstrup et al., NeurIPS'17; spaCy/thinc ``HashEmbed`` use k = 4): id ``x`` reads rows
``h_1(x), ..., h_k(x)`` of an ``m``-row table and sums them. Two ids share all ``k`` rows with probability about
``m^-k``, so nearly every id keeps a distinct vector although rows are shared. Tables with ``n <= rows`` keep one
row per id (no hashing). Implemented by putting the ``k`` rows of every id into its own bag of a plain TorchRec
table, so fbgemm's sum pooling does lookup, combine and pooling in one kernel.

Memory: ``sum_t min(n_t, rows) * d_t * 4 + 8 * k * #tables`` bytes (rows plus k int64 seeds per logical
table). The budget solver picks the largest ``rows`` that fits. Initialisation divides the rows' range by
``sqrt(k)`` so a sum of ``k`` rows has a full table's scale.

Example::

    emb = build_embedding("multi_hash", tables, budget=Budget(ratio=10), num_hashes=2)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods.base import FP32_BYTES, INT64_BYTES, Budget, check_tables, full_bytes
from recsys_embed.methods.hash_fn import mix_to_buckets, reference_bucket, seed_offset
from recsys_embed.methods.layouts import IdLayout
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import RemapMethod
from recsys_embed.methods.solvers import largest_fitting

log = logging.getLogger(__name__)


@register("multi_hash")
class MultiHashEmbedding(RemapMethod):
    """``k`` seeded hashes into ``min(n, rows)`` rows per table, the ``k`` rows summed."""

    budget_knobs = ("rows",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        rows: int,
        num_hashes: int = 2,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        if rows < 1 or num_hashes < 1:
            raise ValueError(f"Method 'multi_hash' needs rows >= 1 and num_hashes >= 1 (got {rows}, {num_hashes}).")
        self.rows, self.num_hashes = rows, num_hashes
        dev = torch.device(device or "cpu")
        hashed = [self._cardinality[f] > rows for f in self._feature_names]
        self.declare_remap([num_hashes if h else 1 for h in hashed], combine="sum")
        physical = [replace(t, num_embeddings=min(t.num_embeddings, rows)) for t in self._tables]
        self.tables = self.add_tables("tables", physical, device=dev)
        self.unbounded_features = {f for f, h in zip(self._feature_names, hashed) if h}
        seeds = torch.arange(len(self._tables) * num_hashes, dtype=torch.int64) + seed * 1_000_003
        self.register_buffer("seeds", seeds.view(-1, num_hashes).to(dev))  # per logical table and hash
        self.register_buffer("feature_table", torch.tensor(self._table_index, device=dev), persistent=False)
        self.register_buffer("hashed", torch.tensor(hashed, device=dev), persistent=False)
        self._hashed_index = [f for f, h in enumerate(hashed) if h]
        with torch.no_grad():
            for t, table in zip(self._tables, physical):
                if t.num_embeddings > rows:
                    bound = math.sqrt(1.0 / t.num_embeddings) / math.sqrt(num_hashes)
                    self.tables.embedding_bags[table.name].weight.uniform_(-bound, bound)

    def id_map(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``(k, ...)``: hash ``c`` of every id (its row in ``min(n, rows)``); full tables keep the id (copy 0)."""
        layout = IdLayout(features, self._hashed_index)
        offsets = layout.spread(seed_offset(self.seeds[self.feature_table].T))  # (k, F): all k hashes in one call
        rows = mix_to_buckets(layout.ids + offsets, self.rows)  # hashed tables fold onto ``rows`` rows
        return layout.merge(rows, self.hashed)

    def reference_rows(self, feature: str, id: int) -> list[int]:
        f = self._feature_names.index(feature)
        if feature not in self.unbounded_features:
            return [id]
        seeds = self.seeds[self._table_index[f]].tolist()
        return [reference_bucket(id, seed, self.rows) for seed in seeds]

    def memory_bytes(self) -> int:
        return self.rows_bytes(self._tables, self.rows, self.num_hashes)

    @staticmethod
    def rows_bytes(tables: Sequence[EmbeddingBagConfig], rows: int, num_hashes: int) -> int:
        table_bytes = sum(min(t.num_embeddings, rows) * t.embedding_dim * FP32_BYTES for t in tables)
        return table_bytes + INT64_BYTES * num_hashes * len(tables)

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> MultiHashEmbedding:
        tables = check_tables(tables)
        k = int(cls.with_defaults(options)["num_hashes"])
        allowed, smallest = budget.max_bytes(tables), cls.rows_bytes(tables, k, k)
        if smallest > allowed:
            raise ValueError(
                f"Method 'multi_hash' cannot fit {allowed} bytes: {k} rows per table (one per hash) already need "
                f"{smallest} bytes (ratio {full_bytes(tables) / smallest:.1f}). Ask for at least {smallest} bytes."
            )
        most = max(t.num_embeddings for t in tables)
        rows = largest_fitting(lambda r: cls.rows_bytes(tables, r, k) <= allowed, k, most)
        method = cls(tables, rows=rows, **options)  # type: ignore[arg-type]
        log.info("multi_hash: rows=%d, k=%d reaches ratio %.2f (asked %s)", rows, k, method.compression_ratio(), budget)
        return method

"""``unified``: Unified Embedding (feature multiplexing): every feature hashes into one shared table.

Idea (Coleman et al., NeurIPS'23, "Unified Embedding: Battle-Tested Feature Representations for Web-Scale ML
Systems"): one table of ``rows`` rows of width ``chunk_dim`` serves all features; each feature has its own seeded
hash (features of one logical table share theirs: same id, same vector), so features multiplex the same rows and
collisions spread across features. A feature of dim ``d`` is built
from ``d / chunk_dim`` chunks (multi-probe), each with an independent hash, concatenated; so features with
different dims share one table. Implemented as one TorchRec table read by one physical feature per chunk.

``hash="identity"`` places the chunks of every table at consecutive offsets (``(offset + id) mod rows``), which
with ``rows >= sum_t n_t * chunks_t`` is collision-free (a full table, used by the parity test).

Memory: ``rows * chunk_dim * 4 + 8 * #tables * max_chunks`` bytes (the table plus an int64 seed for each
logical table and chunk slot, ``max_chunks = max(d) / chunk_dim``). The budget
solver picks the largest ``rows`` that fits.

Example::

    emb = build_embedding("unified", tables, budget=Budget(ratio=20))
    emb = build_embedding("unified", tables, rows=100_000, chunk_dim=8)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods.base import (
    FP32_BYTES,
    INT64_BYTES,
    TBE_DIM_MULTIPLE,
    Budget,
    check_tables,
    full_bytes,
)
from recsys_embed.methods.hash_fn import check_hash_name, mix_to_buckets, reference_bucket, seed_offset
from recsys_embed.methods.layouts import IdLayout
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import RemapMethod

log = logging.getLogger(__name__)
BAGS = "unified@bags"  # the shared table's one physical feature


@register("unified")
class UnifiedEmbedding(RemapMethod):
    """One shared ``rows x chunk_dim`` table; each feature chunk has its own hash into it."""

    budget_knobs = ("rows",)
    version = 2  # 2: seeds per logical table (were per feature)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        rows: int,
        chunk_dim: int | None = None,
        hash: Literal["splitmix64", "identity"] = "splitmix64",
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        if chunk_dim is not None and chunk_dim <= 0:
            raise ValueError(
                f"Method 'unified': chunk_dim must be positive, or None for the dims' gcd (got {chunk_dim})."
            )
        chunk_dim = chunk_dim or math.gcd(*[t.embedding_dim for t in self._tables])
        if rows < 1 or chunk_dim % TBE_DIM_MULTIPLE or any(t.embedding_dim % chunk_dim for t in self._tables):
            raise ValueError(
                f"Method 'unified' needs rows >= 1, chunk_dim a multiple of {TBE_DIM_MULTIPLE} (for fbgemm) and "
                "every embedding_dim divisible by chunk_dim "
                f"(got rows={rows}, chunk_dim={chunk_dim}, dims {sorted({t.embedding_dim for t in self._tables})})."
            )
        check_hash_name("unified", hash)
        self.rows, self.chunk_dim, self.hash_name = rows, chunk_dim, hash
        self.chunks = [self._length_per_key[i] // chunk_dim for i in range(len(self._feature_names))]
        self.unbounded_features = set(self._feature_names)
        self.declare_remap(self.chunks, combine="concat", shared=BAGS)  # mixed dims: fewer chunks, columns dropped
        dev = torch.device(device or "cpu")
        shared = EmbeddingBagConfig(name="unified", num_embeddings=rows, embedding_dim=chunk_dim, feature_names=[BAGS])
        self.tables = self.add_tables("tables", [shared], device=dev)
        most = max(self.chunks)
        seeds = seed * 1_000_003 + torch.arange(len(self._tables) * most).view(-1, most)  # per table and chunk
        self.register_buffer("seeds", seeds.to(dev))
        self.register_buffer("feature_table", torch.tensor(self._table_index, device=dev), persistent=False)
        cards = [t.num_embeddings for t in self._tables]
        chunks = [t.embedding_dim // chunk_dim for t in self._tables]
        starts = [sum(n * k for n, k in zip(cards[:i], chunks[:i])) for i in range(len(cards))]
        offsets = torch.tensor([[starts[i] + c * cards[i] for c in range(most)] for i in self._table_index])
        self.register_buffer("offsets", offsets.to(dev), persistent=False)  # per feature: its table's
        with torch.no_grad():
            bound = math.sqrt(1.0 / max(cards))
            self.tables.embedding_bags["unified"].weight.uniform_(-bound, bound)

    def id_map(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``(chunks, N)``: chunk ``c`` of an id reads row ``hash_{t,c}(x) mod rows`` of the shared table."""
        layout = IdLayout(features)
        if self.hash_name == "identity":
            rows = torch.remainder(layout.spread(self.offsets.T) + layout.ids, self.rows)
        else:  # all chunks of all features in one call: (chunks, ids)
            seeds = self.seeds.index_select(0, self.feature_table)  # (F, chunks): each feature its table's
            rows = mix_to_buckets(layout.ids + layout.spread(seed_offset(seeds.T)), self.rows)
        return layout.flat(rows)

    def reference_rows(self, feature: str, id: int) -> list[int]:
        f = self._feature_names.index(feature)
        if self.hash_name == "identity":
            return [(int(self.offsets[f, c]) + id) % self.rows for c in range(self.chunks[f])]
        seeds = self.seeds[self._table_index[f]].tolist()
        return [reference_bucket(id, seeds[c], self.rows) for c in range(self.chunks[f])]

    def memory_bytes(self) -> int:
        return self.rows_bytes(self.rows, self.chunk_dim, self.seeds.numel())

    @staticmethod
    def rows_bytes(rows: int, chunk_dim: int, seeds: int) -> int:
        return rows * chunk_dim * FP32_BYTES + INT64_BYTES * seeds

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> UnifiedEmbedding:
        tables = check_tables(tables)
        # None (the default) means the dims' gcd, as in the constructor
        chunk_dim = int(cls.with_defaults(options)["chunk_dim"] or math.gcd(*[t.embedding_dim for t in tables]))
        seeds = len(tables) * max(t.embedding_dim for t in tables) // chunk_dim
        allowed = budget.max_bytes(tables)
        rows = (allowed - INT64_BYTES * seeds) // (chunk_dim * FP32_BYTES)
        if rows < 1:
            smallest = cls.rows_bytes(1, chunk_dim, seeds)
            raise ValueError(
                f"Method 'unified' cannot fit {allowed} bytes: one row and the seeds need {smallest} bytes "
                f"(ratio {full_bytes(tables) / smallest:.1f}). Ask for at least {smallest} bytes."
            )
        method = cls(tables, rows=int(rows), **options)  # type: ignore[arg-type]
        log.info(
            "unified: rows=%d x %d reaches ratio %.2f (asked %s)", rows, chunk_dim, method.compression_ratio(), budget
        )
        return method

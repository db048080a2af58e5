"""``mgqe``: multi-granular quantised embeddings: DPQ where frequent ids get more centroids than rare ones.

Idea (Kang et al., WWW'20 companion, "Learning Multi-granular Quantized Embeddings for Large-Vocab Categorical
Features in Recommender Systems"): as ``dpq`` (per-id queries, ``D`` parts, nearest centroid, straight-through, the
centroid term's gradient for the codebooks), but the ``hot_share`` most frequent ids of a table (from the data's id
counts) choose among all ``K_h = high_centroids`` centroids of each part and the others among the first
``K_l = low_centroids`` of the same codebook, so rare ids cost fewer bits. Defaults are the VLDB'24 benchmark's
(Zhang et al., arXiv 2311.15578): 256 centroids for the top 10%, 64 for the rest, 4 parts.

Served form: hot ids' codes packed at ``b_h = ceil(log2 K_h)`` bits, the others' at ``b_l``, the sorted hot ids
(an id's codes are found by one ``searchsorted``: hot ids at their rank, the rest at ``id - #hot ids below it``),
and the codebooks.

Memory: per coded table ``ceil(h D b_h / 8) + ceil((n - h) D b_l / 8) + h s + K_h d 4`` bytes, ``h = round(hot_share
* n)`` hot ids stored at ``s`` bytes each (the smallest int dtype holding ``n - 1``); tables whose rows are no
larger stay full. The budget solver picks the largest ``num_parts`` (dividing every dim) that fits; its ceiling is
one part (``b_h`` bits per hot id, ``b_l`` per other, plus the hot ids and codebooks: about 50x at dim 16 on large
tables, where the benchmark's 4 parts reach about 17x).

Example::

    emb = build_embedding("mgqe", tables, budget=Budget(ratio=10), id_counts=datamodule.id_counts())
    emb = build_embedding("mgqe", tables, num_parts=4, id_counts=counts)  # the benchmark's setting
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchrec import EmbeddingBagConfig

from recsys_embed.methods import codebooks as pq
from recsys_embed.methods.base import FP32_BYTES, Budget, EmbeddingMethod, check_tables, full_bytes
from recsys_embed.methods.dpq import DPQEmbedding
from recsys_embed.methods.registry import register
from recsys_embed.methods.sparse_format import index_dtype

log = logging.getLogger(__name__)
BENCHMARK_PARTS = 4


def hot_rows(n: int, hot_share: float) -> int:
    return min(n, int(round(hot_share * n)))


@register("mgqe")
class MGQEEmbedding(DPQEmbedding):
    """MGQE: DPQ with ``high_centroids`` for the most frequent ids, ``low_centroids`` (a prefix) for the rest."""

    budget_knobs = ("num_parts",)
    needs_id_counts = True
    config_exclude = ("device", "id_counts")  # the counts are data; the hot ids they chose are state

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        num_parts: int = BENCHMARK_PARTS,
        high_centroids: int = 256,
        low_centroids: int = 64,
        hot_share: float = 0.1,
        id_counts: Mapping[str, np.ndarray | torch.Tensor] | None = None,
        served: bool = False,
        reseed_every: int = 100,
        keep_small_tables: bool = True,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        EmbeddingMethod.__init__(self, tables, validate_ids=validate_ids)
        if not 2 <= low_centroids <= high_centroids or not 0.0 < hot_share < 1.0:
            raise ValueError(
                f"Method 'mgqe' needs 2 <= low_centroids <= high_centroids and 0 < hot_share < 1 (got "
                f"{low_centroids}, {high_centroids}, {hot_share})."
            )
        self.high_centroids, self.low_centroids, self.hot_share = high_centroids, low_centroids, hot_share
        self._counts = id_counts
        self._hot: dict[str, int] = {}
        self._setup(num_parts, high_centroids, served, reseed_every, keep_small_tables, seed, device)

    def _resolved_options(self) -> dict[str, Any]:
        return {"num_parts": self.num_parts, "high_centroids": self.high_centroids,
                "low_centroids": self.low_centroids, "hot_share": self.hot_share}  # fmt: skip

    @classmethod
    def from_config(
        cls, tables: Sequence[EmbeddingBagConfig], config: dict[str, Any], device: str | torch.device | None = None
    ) -> MGQEEmbedding:
        """The form of ``config`` with placeholder hot ids: the real ones are the ``hot_*`` buffers of the state dict
        loaded next, so no id counts are read."""
        placeholder = {f: np.arange(t.num_embeddings, 0, -1) for t in tables for f in t.feature_names}
        return cls(tables, **config, id_counts=placeholder, device=device)

    # ---- per-table state: hot ids, and two code buffers when served ----------------------------------------------
    def add_table_state(self, table: EmbeddingBagConfig, served: bool, device: torch.device) -> None:
        n, parts = table.num_embeddings, self.num_parts
        h = self._hot[table.name] = hot_rows(n, self.hot_share)
        counts = self._table_counts(table)
        hot = np.sort(np.lexsort((np.arange(n), -counts))[:h])  # most frequent first, ties to the smaller id
        self.register_buffer(f"hot_{table.name}", torch.as_tensor(hot, dtype=index_dtype(n - 1), device=device))
        if served:
            for group, rows, k in (("hot", h, self.high_centroids), ("cold", n - h, self.low_centroids)):
                size = pq.code_bytes(rows, parts, pq.code_bits(k))
                self.register_buffer(f"codes_{group}_{table.name}", torch.zeros(size, dtype=torch.uint8, device=device))

    def _table_counts(self, table: EmbeddingBagConfig) -> np.ndarray:
        if self._counts is None:
            raise ValueError(
                "Method 'mgqe' needs id_counts (per-feature id frequencies of the training data): pass "
                "id_counts=CTRDataModule(...).id_counts() or recsys_embed.data.load_id_counts(data_dir)."
            )
        total = np.zeros(table.num_embeddings, dtype=np.int64)
        for f in table.feature_names:
            if f not in self._counts or len(self._counts[f]) != table.num_embeddings:
                got = len(self._counts[f]) if f in self._counts else "none"
                raise ValueError(
                    f"Method 'mgqe': id_counts[{f!r}] must have {table.num_embeddings} entries (got {got}); use the "
                    "id_counts.npz written with this dataset."
                )
            total += np.asarray(self._counts[f], dtype=np.int64)
        return total

    def hot_positions(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per id: the number of hot ids below it (its rank if hot) and whether it is hot."""
        hot, h = getattr(self, f"hot_{name}").to(torch.int64), self._hot[name]
        position = torch.searchsorted(hot, ids)
        if h == 0:
            return position, torch.zeros_like(ids, dtype=torch.bool)
        return position, hot[position.clamp(max=h - 1)] == ids

    def allowed_centroids(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        _, is_hot = self.hot_positions(name, ids)
        return torch.where(is_hot, self.high_centroids, self.low_centroids)

    def packed_codes(self, name: str, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        cold = torch.ones(codes.shape[0], dtype=torch.bool, device=codes.device)
        cold[getattr(self, f"hot_{name}").to(torch.int64)] = False
        return {
            f"codes_hot_{name}": pq.pack_codes(codes[~cold], pq.code_bits(self.high_centroids)),
            f"codes_cold_{name}": pq.pack_codes(codes[cold], pq.code_bits(self.low_centroids)),
        }

    def served_codes(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        h, n, parts = self._hot[name], self._num_rows[name], self.num_parts
        position, is_hot = self.hot_positions(name, ids)
        high, low = pq.code_bits(self.high_centroids), pq.code_bits(self.low_centroids)
        if h == 0 or h == n:  # one group only
            group, bits = ("hot", high) if h else ("cold", low)
            return pq.unpack_codes(getattr(self, f"codes_{group}_{name}"), position if h else ids, parts, bits)
        hot = pq.unpack_codes(getattr(self, f"codes_hot_{name}"), position.clamp(max=h - 1), parts, high)
        cold = pq.unpack_codes(getattr(self, f"codes_cold_{name}"), (ids - position).clamp(max=n - h - 1), parts, low)
        return torch.where(is_hot.unsqueeze(1), hot, cold)

    @classmethod
    def coded_bytes(cls, table: EmbeddingBagConfig, options: dict[str, Any]) -> int:
        n, parts, d = table.num_embeddings, int(options["num_parts"]), table.embedding_dim
        h = hot_rows(n, float(options["hot_share"]))
        high, low = int(options["high_centroids"]), int(options["low_centroids"])
        codes = pq.code_bytes(h, parts, pq.code_bits(high)) + pq.code_bytes(n - h, parts, pq.code_bits(low))
        hot_ids = h * torch.empty((), dtype=index_dtype(n - 1)).element_size()
        return codes + hot_ids + high * d * FP32_BYTES

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> MGQEEmbedding:
        tables = check_tables(tables)
        allowed, full, dims = budget.max_bytes(tables), full_bytes(tables), math.gcd(*[t.embedding_dim for t in tables])
        base = cls.with_defaults(options)
        sizes = {p: cls.served_bytes(tables, {**base, "num_parts": p}) for p in range(1, dims + 1) if dims % p == 0}
        fitting = [p for p, size in sizes.items() if size <= allowed]
        if not fitting:
            ceiling = full / sizes[1]
            benchmark = ""
            if BENCHMARK_PARTS in sizes:
                benchmark = f"; the benchmark's {BENCHMARK_PARTS} parts reach {full / sizes[BENCHMARK_PARTS]:.1f}x"
            raise ValueError(
                f"Method 'mgqe' cannot fit {allowed} bytes (ratio {full / allowed:.1f}): its ratio ceiling on these "
                f"tables is {ceiling:.1f}x ({sizes[1]} bytes: one part, {base['high_centroids']}/"
                f"{base['low_centroids']} centroids for the top {base['hot_share']:.0%}/the rest{benchmark}). Ask for "
                f"at least {sizes[1]} bytes, or use a hashing method for higher ratios."
            )
        parts = max(fitting)
        method = cls(tables, num_parts=parts, **options)  # type: ignore[arg-type]
        log.info("mgqe: %d parts reach ratio %.2f (asked %s)", parts, method.compression_ratio(), budget)
        return method

"""``adapt``: frequency-aware hot/cold split: frequent ids get their own rows, the rest share hashed rows.

Idea (frequency-based hybrid embeddings, as in the VLDB'24 benchmark of Zhang et al., arXiv 2311.15578, and the
hot/cold designs it surveys): Zipf-distributed ids put most traffic on few ids. Of a table's ``R`` rows,
``hot_share * R`` go to the most frequent ids in the training data (one row each, never collide), the other rows
are a hashed table shared by all remaining ids. Tables with ``n <= rows`` stay full. The hot ids are stored as one
sorted int64 array (a lookup is a vectorized ``searchsorted``); frequencies come from the data's
``id_counts.npz`` (``CTRDataModule.id_counts()``).

Memory: ``sum_t min(n_t, rows) * d_t * 4 + 8 * #hot ids + 8 * #tables`` bytes (rows, the sorted hot ids, one
int64 seed per table). Hot ids are chosen per table (counts of a table's features added). The budget solver
picks the largest ``rows`` that fits.

Example::

    emb = build_embedding("adapt", tables, budget=Budget(ratio=10), id_counts=datamodule.id_counts())
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods.base import FP32_BYTES, INT64_BYTES, Budget, check_tables, full_bytes
from recsys_embed.methods.hash_fn import mix_to_buckets, reference_bucket, seed_offset
from recsys_embed.methods.layouts import IdLayout
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import RemapMethod
from recsys_embed.methods.solvers import largest_fitting

log = logging.getLogger(__name__)


def hot_rows(n: int, rows: int, hot_share: float) -> int:
    """Hot rows of a table with ``n`` ids under a ``rows`` cap (0 when the table stays full)."""
    return 0 if n <= rows else min(rows - 1, int(round(hot_share * rows)))


@torch.fx.wrap
def hot_positions(
    ids: torch.Tensor,
    sizes: list[int] | None,
    computed: list[int] | None,
    hashed: list[bool],
    first: list[int],
    hot_keys: torch.Tensor,
    hot: int,
) -> torch.Tensor:
    """Per id of a folded feature: its position among its table's ``hot`` sorted hot ids (one ``searchsorted``
    per feature; an fx leaf). ``ids`` are :class:`IdLayout`'s: ``(F', L)`` rows (``sizes`` None) or flat with
    ``sizes`` ids per feature; ``computed`` are its features (None: all, in order); feature ``f``'s hot ids start at
    ``first[f]``."""
    position = torch.zeros_like(ids, dtype=torch.int64)
    queries = ids.unbind(0) if sizes is None else ids.split(sizes)
    found = position.unbind(0) if sizes is None else position.split(sizes)
    for f, query, out in zip(computed if computed is not None else range(len(sizes)), queries, found):  # type: ignore[arg-type]
        if hashed[f]:
            torch.searchsorted(hot_keys[first[f] : first[f] + hot], query, out=out)
    return position


@register("adapt")
class AdaptiveHotCold(RemapMethod):
    """Top ``hot_share * rows`` ids by frequency get own rows; the others hash into the remaining rows."""

    budget_knobs = ("rows",)

    needs_id_counts = True
    config_exclude = ("device", "id_counts")  # the counts are data; the hot ids they chose are state

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        rows: int,
        id_counts: Mapping[str, np.ndarray | torch.Tensor] | None = None,
        hot_share: float = 0.5,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        if rows < 2 or not 0.0 <= hot_share < 1.0:
            raise ValueError(f"Method 'adapt' needs rows >= 2 and 0 <= hot_share < 1 (got {rows}, {hot_share}).")
        self.rows, self.hot_share = rows, hot_share
        hot = [hot_rows(t.num_embeddings, rows, hot_share) for t in self._tables]
        counts = self._checked_counts(id_counts, [f for t, h in zip(self._tables, hot) if h for f in t.feature_names])
        hot_keys = []
        for t, h in zip(self._tables, hot):
            if h:  # most frequent ids of the table first, ties to the smaller id; stored sorted for searchsorted
                freq = sum(np.asarray(counts[f], dtype=np.int64) for f in t.feature_names)
                hot_keys.append(np.sort(np.lexsort((np.arange(t.num_embeddings), -freq))[:h]))
        dev = torch.device(device or "cpu")
        keys = np.concatenate(hot_keys) if hot_keys else np.zeros(0, dtype=np.int64)
        self.register_buffer("hot_keys", torch.as_tensor(keys, dtype=torch.int64, device=dev))  # tables in order
        self.register_buffer("seeds", seed * 1_000_003 + torch.arange(len(self._tables), device=dev))  # per table
        starts = np.cumsum([0, *hot])[:-1].tolist()
        # every table above ``rows`` ids has the same hot/cold split; per feature: where its table's hot ids start
        self._hot = max(hot)
        hashed = [self._tables[i].num_embeddings > rows for i in self._table_index]
        self._hashed_index = [f for f, h in enumerate(hashed) if h]
        self.unbounded_features = {f for f, h in zip(self._feature_names, hashed) if h}  # cold ids hash
        first = [starts[i] if h else 0 for i, h in zip(self._table_index, hashed)]
        self.hashed_list, self.first_list = hashed, first
        self.register_buffer("first_key", torch.tensor(first, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("hashed", torch.tensor(hashed, device=dev), persistent=False)
        self.register_buffer("feature_table", torch.tensor(self._table_index, device=dev), persistent=False)
        physical = [replace(t, num_embeddings=min(t.num_embeddings, rows)) for t in self._tables]
        self.tables = self.add_tables("tables", physical, device=dev)
        self.declare_remap([1] * len(self._feature_names))

    @classmethod
    def from_config(
        cls, tables: Sequence[EmbeddingBagConfig], config: dict[str, Any], device: str | torch.device | None = None
    ) -> AdaptiveHotCold:
        """The form of ``config`` with placeholder hot ids (the first ids of each table): the real ones are the
        ``hot_keys`` buffer of the state dict loaded next, so no id counts are read."""
        placeholder = {f: np.arange(t.num_embeddings, 0, -1) for t in tables for f in t.feature_names}
        return cls(tables, **config, id_counts=placeholder, device=device)

    def _checked_counts(self, id_counts: Mapping | None, needed: list[str]) -> Mapping:
        if not needed:
            return {}
        if id_counts is None:
            raise ValueError(
                "Method 'adapt' needs id_counts (per-feature id frequencies of the training data): pass "
                "id_counts=CTRDataModule(...).id_counts() or recsys_embed.data.load_id_counts(data_dir)."
            )
        for f in needed:
            if f not in id_counts or len(id_counts[f]) != self._cardinality[f]:
                got = len(id_counts[f]) if f in id_counts else "none"
                raise ValueError(
                    f"Method 'adapt': id_counts[{f!r}] must have {self._cardinality[f]} entries (got {got}); "
                    "use the id_counts.npz written with this dataset."
                )
        return id_counts

    def id_map(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Hot ids -> their own row; cold ids -> ``hot + hash(id) mod cold``; full tables -> the id itself."""
        layout = IdLayout(features, self._hashed_index)
        ids, hot, cold = layout.ids, self._hot, self.rows - self._hot  # every folded table has the same split
        rows = mix_to_buckets(ids + layout.spread(seed_offset(self.seeds[self.feature_table])), cold).add_(hot)
        if hot and self._hashed_index:
            sizes = None if layout.uniform else layout.sizes
            position = hot_positions(ids, sizes, layout.computed, self.hashed_list, self.first_list, self.hot_keys, hot)
            index = position.clamp(max=hot - 1).add_(layout.spread(self.first_key))
            is_hot = self.hot_keys.index_select(0, index.view(-1)).view_as(ids) == ids
            rows = torch.where(is_hot, position, rows)
        return layout.merge(rows, self.hashed).unsqueeze(0)

    def reference_rows(self, feature: str, id: int) -> list[int]:
        f = self._feature_names.index(feature)
        if not self.hashed_list[f]:
            return [id]
        first = self.first_list[f]
        hot = self.hot_keys[first : first + self._hot].tolist()
        if id in hot:
            return [hot.index(id)]
        return [self._hot + reference_bucket(id, int(self.seeds[self._table_index[f]]), self.rows - self._hot)]

    def memory_bytes(self) -> int:
        return self.rows_bytes(self._tables, self.rows, self.hot_share)

    @staticmethod
    def rows_bytes(tables: Sequence[EmbeddingBagConfig], rows: int, hot_share: float) -> int:
        total = 0
        for t in tables:
            total += min(t.num_embeddings, rows) * t.embedding_dim * FP32_BYTES + INT64_BYTES  # rows + the seed
            total += INT64_BYTES * hot_rows(t.num_embeddings, rows, hot_share)
        return total

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> AdaptiveHotCold:
        tables = check_tables(tables)
        share = float(cls.with_defaults(options)["hot_share"])
        allowed, smallest = budget.max_bytes(tables), cls.rows_bytes(tables, 2, share)
        if smallest > allowed:
            raise ValueError(
                f"Method 'adapt' cannot fit {allowed} bytes: two rows per table already need {smallest} bytes "
                f"(ratio {full_bytes(tables) / smallest:.1f}). Ask for at least {smallest} bytes."
            )
        most = max(t.num_embeddings for t in tables)
        rows = largest_fitting(lambda r: cls.rows_bytes(tables, r, share) <= allowed, 2, most)
        method = cls(tables, rows=rows, **options)  # type: ignore[arg-type]
        log.info("adapt: rows=%d reaches ratio %.2f (asked %s)", rows, method.compression_ratio(), budget)
        return method

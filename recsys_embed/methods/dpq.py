"""``dpq``: differentiable product quantisation: each id's embedding is ``D`` codes into per-table codebooks.

Idea (Chen et al., ICML'20, "Differentiable Product Quantization for End-to-End Embedding Compression", the "vq"
variant): every id keeps a query row (a TorchRec ``EmbeddingCollection``: fused and sharded like a table), split into
``D = num_parts`` parts; each part becomes the nearest of the ``K = num_centroids`` centroids of its codebook (one
``(D, K, d / D)`` codebook per table, shared by its ids). The output is the centroids with the query's gradient
(straight-through), and the codebooks get the gradient of the paper's centroid term ``mean((c - sg(q))^2)`` in the
lookup's backward (:class:`~recsys_embed.methods.codebooks.StraightThroughQuantize`), so any training loop trains
them (the dense optimizer) with no extra loss term. Codebooks start as ``K`` query rows of their table; every
``reseed_every`` steps the centroids no id chose since the last time (dead: codebook collapse) move onto random
queries of the last batch. Unlike the paper, no batch norm on the distances (a served row must not depend on the
batch). Served form (``served=True``, :meth:`to_serving`): every id's codes packed at ``b = ceil(log2 K)`` bits and
the codebooks; the queries are training-only state.

Memory: ``sum_{t coded} (ceil(n_t D b / 8) + K d_t 4) + sum_{t kept} n_t d_t 4`` bytes (served); a table whose rows
take no more bytes than its codes and codebook keeps its rows (``keep_small_tables``). The budget solver picks the
most code bits per id (``D * b``, ``D`` dividing every dim, ``K`` a power of two up to 256) that fit, ties to more
centroids; the fewest bytes (1 part of 2 centroids: 1 bit per id) are its ceiling.

Example::

    emb = build_embedding("dpq", tables, budget=Budget(ratio=10))
    emb = build_embedding("dpq", tables, num_parts=8, num_centroids=32)  # the VLDB'24 benchmark's setting
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods import codebooks as pq
from recsys_embed.methods.base import FP32_BYTES, Budget, EmbeddingMethod, check_tables, full_bytes
from recsys_embed.methods.layouts import keyed, make_kjt
from recsys_embed.methods.registry import register

log = logging.getLogger(__name__)
MAX_SOLVED_CENTROIDS = 256


@register("dpq")
class DPQEmbedding(EmbeddingMethod):
    """DPQ-VQ: per-id queries quantised part by part to per-table codebooks; served as packed codes + codebooks."""

    budget_knobs: tuple[str, ...] = ("num_parts", "num_centroids")

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        num_parts: int,
        num_centroids: int = 256,
        served: bool = False,
        reseed_every: int = 100,
        keep_small_tables: bool = True,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        self._setup(num_parts, num_centroids, served, reseed_every, keep_small_tables, seed, device)

    def _setup(
        self, parts: int, centroids: int, served: bool, reseed_every: int, keep: bool, seed: int, device: Any
    ) -> None:
        """Everything but the option list (shared with ``mgqe``)."""
        dims = math.gcd(*[t.embedding_dim for t in self._tables])
        if parts < 1 or dims % parts or not 2 <= centroids <= 1 << pq.MAX_CODE_BITS or reseed_every < 0:
            raise ValueError(
                f"Method {self.name!r} needs num_parts dividing every embedding_dim ({dims} does not split into "
                f"{parts}), 2 <= centroids <= {1 << pq.MAX_CODE_BITS} (got {centroids}) and reseed_every >= 0 "
                f"(got {reseed_every})."
            )
        huge = [t for t in self._tables if not served and t.num_embeddings * t.embedding_dim >= 2**31]
        if huge:
            raise ValueError(
                f"Method {self.name!r}: table {huge[0].name!r} has {huge[0].num_embeddings} ids; training keeps a "
                "query row per id (fewer than 2^31 values per table): use a hashing method for this table."
            )
        self.num_parts, self.num_centroids, self.served, self.reseed_every = parts, centroids, served, reseed_every
        self.seed, self._num_rows = seed, {t.name: t.num_embeddings for t in self._tables}
        #: the knobs the memory formula reads (resolved here: the recorded options are set after __init__)
        self.knobs = {**self._resolved_options(), "keep_small_tables": keep}
        dev = torch.device(device or "cpu")
        coded = [t for t in self._tables if not self.keeps_rows(t, self.knobs)]
        self.coded_tables = [t.name for t in coded]
        kept = [t for t in self._tables if t.name not in self.coded_tables]
        self.tables = self.add_tables("tables", kept, device=dev) if kept else None
        names = self._feature_names
        self._kept_features = [j for j, f in enumerate(names) if self._table_of[f] not in self.coded_tables]
        self.codebooks = nn.ParameterDict()
        self._generator = torch.Generator().manual_seed(seed)
        self._recent: dict[str, torch.Tensor] = {}
        self._groups: dict[int, list[EmbeddingBagConfig]] = {}
        for t in coded:
            self._groups.setdefault(t.embedding_dim, []).append(t)
            shape = (parts, centroids, t.embedding_dim // parts)
            self.codebooks[t.name] = nn.Parameter(torch.zeros(shape, device=dev))
            self.add_table_state(t, served, dev)
        if served:
            return
        for d, group in self._groups.items():
            configs = [EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=d,
                                       feature_names=list(t.feature_names)) for t in group]  # fmt: skip
            self.add_tables(f"queries_d{d}", configs, pooled=False, device=dev)
        for t in coded:  # training only: how often each centroid was chosen since the last re-seed
            self.register_buffer(f"usage_{t.name}", torch.zeros(parts, centroids, dtype=torch.int64, device=dev))
        if dev.type != "meta":
            self.init_codebooks()

    def _resolved_options(self) -> dict[str, Any]:
        return {"num_parts": self.num_parts, "num_centroids": self.num_centroids}

    # ---- per-table hooks (mgqe overrides these) ------------------------------------------------------------------
    def add_table_state(self, table: EmbeddingBagConfig, served: bool, device: torch.device) -> None:
        """The state of one coded table besides its codebook: the served form's packed codes."""
        if not served:
            return
        size = pq.code_bytes(table.num_embeddings, self.num_parts, pq.code_bits(self.num_centroids))
        self.register_buffer(f"codes_{table.name}", torch.zeros(size, dtype=torch.uint8, device=device))

    def allowed_centroids(self, name: str, ids: torch.Tensor) -> torch.Tensor | None:
        """Per id, how many of the first centroids it may use (None: all)."""
        return None

    def packed_codes(self, name: str, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The served buffers holding the ``(n, D)`` codes of every id of table ``name``."""
        return {f"codes_{name}": pq.pack_codes(codes, pq.code_bits(self.num_centroids))}

    def served_codes(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        bits = pq.code_bits(self.num_centroids)
        return pq.unpack_codes(getattr(self, f"codes_{name}"), ids, self.num_parts, bits)

    @classmethod
    def coded_bytes(cls, table: EmbeddingBagConfig, options: dict[str, Any]) -> int:
        """Served bytes of one coded table: packed codes plus its codebook."""
        parts, k = int(options["num_parts"]), int(options["num_centroids"])
        return pq.code_bytes(table.num_embeddings, parts, pq.code_bits(k)) + k * table.embedding_dim * FP32_BYTES

    # ---- memory --------------------------------------------------------------------------------------------------
    @classmethod
    def keeps_rows(cls, table: EmbeddingBagConfig, options: dict[str, Any]) -> bool:
        """Whether ``table`` keeps its full rows: they take no more bytes than its codes and codebook would."""
        return bool(options["keep_small_tables"]) and full_bytes([table]) <= cls.coded_bytes(table, options)

    @classmethod
    def served_bytes(cls, tables: Sequence[EmbeddingBagConfig], options: dict[str, Any]) -> int:
        """The memory formula (module docstring) for resolved ``options``."""
        return sum(full_bytes([t]) if cls.keeps_rows(t, options) else cls.coded_bytes(t, options) for t in tables)

    def memory_bytes(self) -> int:
        return self.served_bytes(self._tables, self.knobs)

    # ---- training state ------------------------------------------------------------------------------------------
    def queries(self, name: str) -> torch.Tensor:
        d = next(t.embedding_dim for t in self._tables if t.name == name)
        return self.get_submodule(f"queries_d{d}").embeddings[name].weight

    def init_codebooks(self) -> None:
        """Each codebook := ``K`` query rows of its table (every row first when ``K >= n``, then random repeats)."""
        with torch.no_grad():
            for i, name in enumerate(self.coded_tables):
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
                rows = self.queries(name)
                self.codebooks[name].copy_(pq.codebook_from_rows(rows, self.num_parts, self.num_centroids, g))

    def all_codes(self, name: str) -> torch.Tensor:
        """``(n, D)``: the code of every id of table ``name`` (nearest centroids of its queries)."""
        weight = self.queries(name).detach()
        ids = torch.arange(weight.shape[0], device=weight.device)
        parts = weight.float().view(weight.shape[0], self.num_parts, weight.shape[1] // self.num_parts)
        return pq.nearest_centroids(parts, self.codebooks[name], self.allowed_centroids(name, ids))

    def centroid_usage(self) -> dict[str, float]:
        """Per coded table, the share of its centroids that some id's code uses (the served codes)."""
        usage = {}
        for name in self.coded_tables:
            every = torch.arange(self._num_rows[name], device=self.device)
            codes = self.served_codes(name, every) if self.served else self.all_codes(name)
            usage[name] = float((pq.centroid_usage(codes, self.codebooks[name].shape[1]) > 0).float().mean())
        return usage

    # ---- forward -------------------------------------------------------------------------------------------------
    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        batch, names = features.stride(), self._feature_names
        ids = features.values().split(features.length_per_key())
        lengths = features.lengths().view(len(names), -1)
        if self.served:
            coded = [(j, self._table_of[f]) for j, f in enumerate(names) if self._table_of[f] in self.coded_tables]
            rows = {j: pq.centroid_rows(self.codebooks[t], self.served_codes(t, ids[j])) for j, t in coded}
        else:
            rows = self._trained_rows(ids, lengths, batch)
        kept = None
        if self.tables is not None:
            every = len(self._kept_features) == len(names)
            kept = self.tables(features if every else features.permute(self._kept_features)).values()
        return keyed(pq.pooled(rows, kept, lengths, self._length_per_key), names, self._length_per_key)

    def _trained_rows(self, ids: Sequence[torch.Tensor], lengths: torch.Tensor, batch: int) -> dict[int, torch.Tensor]:
        rows, names = {}, self._feature_names
        for d, group in self._groups.items():
            keys = [f for t in group for f in t.feature_names]
            idx = [names.index(f) for f in keys]
            kjt = make_kjt(keys, torch.cat([ids[j] for j in idx]), torch.cat([lengths[j] for j in idx]), batch)
            looked_up = self.get_submodule(f"queries_d{d}")(kjt)
            for f, j in zip(keys, idx):
                name, q = self._table_of[f], looked_up[f].values().float()
                parts = q.view(q.shape[0], self.num_parts, d // self.num_parts)
                unique, inverse, first = pq.distinct(ids[j])  # search each distinct id once
                allowed = self.allowed_centroids(name, unique)
                codes = pq.nearest_centroids(parts[first], self.codebooks[name], allowed)[inverse]
                if not self.training:
                    rows[j] = pq.centroid_rows(self.codebooks[name], codes)
                    continue
                rows[j] = pq.StraightThroughQuantize.apply(q, self.codebooks[name], codes)
                with torch.no_grad():
                    getattr(self, f"usage_{name}").add_(pq.centroid_usage(codes, self.codebooks[name].shape[1]))
                self._recent[name] = parts.detach()
        return rows

    # ---- training hooks ------------------------------------------------------------------------------------------
    def on_train_step(self, step: int) -> None:
        """Every ``reseed_every`` steps: dead centroids (chosen by no id since the last time) onto recent queries."""
        if self.served or not self.reseed_every or (step + 1) % self.reseed_every:
            return
        moved = 0
        for name in self.coded_tables:
            usage, recent = getattr(self, f"usage_{name}"), self._recent.get(name)
            moved += pq.reseed_dead(self.codebooks[name].data, usage, recent, self._generator)
            usage.zero_()
        log.debug("%s: step %d re-seeded %d dead centroids", self.name, step, moved)

    # ---- the served form -----------------------------------------------------------------------------------------
    def to_serving(self) -> nn.Module:
        if self.served:
            return super().to_serving()
        served = type(self).from_config(self._tables, {**self.config(), "served": True}, device=self.device)
        state, own = served.state_dict(), self.state_dict()
        for name in self.coded_tables:
            state.update(self.packed_codes(name, self.all_codes(name)))
        served.load_state_dict({k: (own[k] if k in own else v).detach() for k, v in state.items()})
        return served.eval()

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> DPQEmbedding:
        tables = check_tables(tables)
        allowed, full, dims = budget.max_bytes(tables), full_bytes(tables), math.gcd(*[t.embedding_dim for t in tables])
        base = cls.with_defaults(options)
        choices = [
            (parts * bits, 1 << bits, parts)
            for parts in range(1, dims + 1)
            if dims % parts == 0
            for bits in range(1, pq.code_bits(MAX_SOLVED_CENTROIDS) + 1)
        ]
        sizes = {c: cls.served_bytes(tables, {**base, "num_parts": c[2], "num_centroids": c[1]}) for c in choices}
        fitting = [c for c in choices if sizes[c] <= allowed]
        if not fitting:
            fewest = min(sizes.values())
            raise ValueError(
                f"Method 'dpq' cannot fit {allowed} bytes (ratio {full / allowed:.1f}): its fewest bytes, 1 part of 2 "
                f"centroids (1 bit per id) plus the codebooks, are {fewest} (ratio {full / fewest:.1f}, its ceiling on "
                f"these tables). Ask for at least {fewest} bytes, or use a hashing method."
            )
        _, centroids, parts = max(fitting)
        method = cls(tables, num_parts=parts, num_centroids=centroids, **options)  # type: ignore[arg-type]
        log.info("dpq: %d parts x %d centroids reach ratio %.2f (asked %s)", parts, centroids,
                 method.compression_ratio(), budget)  # fmt: skip
        return method

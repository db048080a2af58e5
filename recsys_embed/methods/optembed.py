"""``optembed``: OptEmbed, threshold-pruned rows and a searched dim per field, found on a supernet (3 stages).

Idea (Lyu et al., CIKM'22, "OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction", arXiv
2208.04482):

1. ``supernet``: full tables; a row whose L1 norm is at most its field's learnable threshold ``t_f`` gives zeros
   (``mask = step(|e|_1 - t_f)``, the paper's straight-through gradient), and ``alpha * sum_f exp(-t_f)`` pulls the
   thresholds up (they start at 0; own Adam group, ``threshold_lr``). Each batch also trains a random dim per field
   (uniform over ``4, 8, ..., d``: row prefixes), so one supernet trains every candidate dim;
2. ``search`` (``max_epochs=0``, no training): evolutionary search of the per-field dims on the trained supernet,
   fitness = the model's validation AUC (:mod:`recsys_embed.training.search`; the paper's settings are defaults);
3. ``retrain``: only the kept rows at their searched dims, reset to the supernet's initial values (the paper's
   lottery-ticket rewind, ``retrain_from="init"``, regenerated from ``seed``) or kept as trained (``"supernet"``).
   The dense layers carry over from the supernet stage (a method owns only its rows).

Rows live in TorchRec ``EmbeddingCollection``s (unpooled, one per dim), so they fuse and shard as tables; the row
mask needs each id's row, so the method pools itself (a sum per bag). Pruned ids give zero vectors.

Memory: ``sum_t kept_t * d_t * 4 + (kept_t < n_t) * 4 * kept_t`` bytes, the served form: kept rows at their dims
plus their sorted ids as int32 (none for a table kept whole).

Budget: OptEmbed takes no memory target by itself. With one (``target_bytes``), every served form keeps, of the
rows above threshold, those of largest margin ``|e|_1 - t_f`` that fit at its dims (one raised threshold for every
field), so the search compares dims at equal memory; ``compression_ratio()`` reports the ratio reached. A supernet
serves (and evaluates) that cut at full dims and trains every row (``training_bytes()``). Tables need dims in
multiples of 4 and fewer than 2^31 rows.

Example::

    emb = build_embedding("optembed", tables, budget=Budget(ratio=10))  # stages: supernet, search, retrain
    emb = build_embedding("optembed", tables, alpha=1e-5, iterations=10)  # no budget: the thresholds decide
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import TBE_DIM_MULTIPLE, Budget, EmbeddingMethod, ParameterGroup, Stage, check_tables
from recsys_embed.methods.layouts import bag_sums, keyed, make_kjt
from recsys_embed.methods.registry import register
from recsys_embed.methods.row_pruning import (
    MarginRanking,
    StraightThroughStep,
    initial_rows,
    kept_positions,
    served_bytes,
)

log = logging.getLogger(__name__)
STAGES = ("supernet", "search", "retrain")


@register("optembed")
class OptEmbed(EmbeddingMethod):
    """OptEmbed: threshold-pruned rows and per-field dims searched on a supernet, then retrained."""

    budget_knobs = ("target_bytes",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        stage: Literal["supernet", "search", "retrain"] = "supernet",
        target_bytes: int | None = None,
        alpha: float = 1e-4,
        threshold_lr: float = 1e-3,
        mutations: int = 10,
        crossovers: int = 10,
        iterations: int = 30,
        mutation_prob: float = 0.1,
        keep: int = 15,
        search_batches: int | None = None,
        retrain_from: Literal["init", "supernet"] = "init",
        dims: list[int] | None = None,
        kept_rows: list[int] | None = None,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        for t in self._tables:
            if t.embedding_dim % TBE_DIM_MULTIPLE or t.num_embeddings >= 2**31:
                raise ValueError(
                    f"Method 'optembed': table {t.name!r} has dim {t.embedding_dim} and {t.num_embeddings} rows; it "
                    f"needs a dim in multiples of {TBE_DIM_MULTIPLE} (candidate dims) and fewer than 2^31 rows (its "
                    "supernet holds every row, kept ids are int32): use another method for this table."
                )
        if stage not in STAGES or retrain_from not in ("init", "supernet"):
            raise ValueError(f"Method 'optembed': stage must be one of {STAGES} and retrain_from 'init' or 'supernet'.")
        given = [dims is not None, kept_rows is not None]
        if given != [stage == "retrain"] * 2:
            raise ValueError("Method 'optembed': dims and kept_rows are given exactly in stage 'retrain' (next_stage).")
        if dims is not None and kept_rows is not None:
            ok = len(dims) == len(kept_rows) == len(self._tables) and all(
                0 < d <= t.embedding_dim and d % TBE_DIM_MULTIPLE == 0 and 0 <= k <= t.num_embeddings
                for d, k, t in zip(dims, kept_rows, self._tables)
            )
            if not ok:
                raise ValueError(
                    f"Method 'optembed': dims {dims} and kept_rows {kept_rows} need one entry per table, dims in "
                    f"multiples of {TBE_DIM_MULTIPLE} up to the table's dim, kept rows up to its rows."
                )
        self.stage, self.target_bytes, self.alpha, self.threshold_lr = stage, target_bytes, alpha, threshold_lr
        self.mutations, self.crossovers, self.iterations = mutations, crossovers, iterations
        self.mutation_prob, self.keep = mutation_prob, keep
        self.search_batches, self.retrain_from, self.seed = search_batches, retrain_from, seed
        dev = torch.device(device or "cpu")
        full = [t.embedding_dim for t in self._tables]
        self.kept_rows = list(kept_rows) if kept_rows is not None else [t.num_embeddings for t in self._tables]
        self.table_dims = list(dims) if dims is not None else full  # retrain: the searched dims
        self._groups: dict[int, list[int]] = {}  # physical dim -> indices of its tables (one collection per dim)
        for i, (k, d) in enumerate(zip(self.kept_rows, self.table_dims)):
            if k > 0:
                self._groups.setdefault(d, []).append(i)
        for d, members in self._groups.items():
            configs = [
                EmbeddingConfig(
                    name=self._tables[i].name,
                    num_embeddings=self.kept_rows[i],
                    embedding_dim=d,
                    feature_names=list(self._tables[i].feature_names),
                )
                for i in members
            ]
            self.add_tables(f"rows_d{d}", configs, pooled=False, device=dev)
        if stage == "retrain":
            self.dims = self.table_dims  # the searched dims (a buffer, the served dims, in the other stages)
            for i, t in enumerate(self._tables):
                size = (
                    self.kept_rows[i] if self.kept_rows[i] < t.num_embeddings else 0
                )  # a table kept whole needs no ids
                self.register_buffer(f"kept_ids_{i}", torch.zeros(size, dtype=torch.int32, device=dev))
            return
        with torch.no_grad():
            for i in range(len(self._tables) if dev.type != "meta" else 0):
                self.weight(i).copy_(self.initial_rows(i))
        zeros = torch.zeros(len(self._tables), device=dev)
        if stage == "supernet":
            self.threshold = nn.Parameter(zeros)
        else:
            self.register_buffer("threshold", zeros)
        self.register_buffer("dims", torch.tensor(full, device=dev))  # served dims (search: the result)
        self.register_buffer("active_dims", torch.tensor(full, device=dev), persistent=False)  # this batch's
        self._ranking: MarginRanking | None = None

    # ---- rows ----------------------------------------------------------------------------------------------------
    def weight(self, i: int) -> torch.Tensor:
        """Table ``i``'s stored rows (plain or fused collection)."""
        return self.get_submodule(f"rows_d{self.table_dims[i]}").embeddings[self._tables[i].name].weight

    def initial_rows(self, i: int) -> torch.Tensor:
        """Table ``i``'s supernet rows at initialisation, regenerated from ``seed`` (TorchRec's uniform init)."""
        return initial_rows(self._tables[i], self.seed, i).to(self.device)

    def keep_masks(self, dims: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per table, the rows the served form keeps at ``dims`` (default: the served dims): margin ``|e|_1 - t_f``
        above 0 and, with a ``target_bytes``, the largest margins that fit (the ranking is cached in eval mode)."""
        dims = [int(d) for d in (self.dims if dims is None else dims)]
        ranking = self._ranking if not self.training else None
        if ranking is None:
            with torch.no_grad():
                ranking = MarginRanking(
                    [self.weight(i).float().abs().sum(1) - self.threshold[i] for i in range(len(self._tables))]
                )
            self._ranking = ranking if not self.training else None
        return ranking.keep(dims, self.target_bytes)

    def train(self, mode: bool = True) -> OptEmbed:
        if mode:
            self._ranking = None  # rows and thresholds change while training (eval keeps the margins it ranked)
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._ranking = None  # new rows, new margins
        super()._load_from_state_dict(*args, **kwargs)

    # ---- forward -------------------------------------------------------------------------------------------------
    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        # indexed, never iterated, and sizes from python ints where possible: the served form traces with fx
        batch, names = features.stride(), self._feature_names
        ids = features.values().split(features.length_per_key())
        lengths = features.lengths().view(len(names), -1)
        compact = self.stage == "retrain"
        masks = None if compact or self.training else self.keep_masks()
        dims = None if compact else (self.active_dims if self.training else self.dims)
        pooled: dict[str, torch.Tensor] = {}
        for d, members in self._groups.items():
            keys = [f for i in members for f in self._tables[i].feature_names]
            factors: dict[str, torch.Tensor] = {}
            rows_ids = []
            for f in keys:
                j = names.index(f)
                i = self._table_index[j]
                if compact:
                    rows_ids.append(self._remap(i, ids[j], factors, f))
                else:
                    rows_ids.append(ids[j])
                    if masks is not None:
                        factors[f] = masks[i][ids[j]].to(torch.float32)
            group_lengths = torch.cat([lengths[names.index(f)] for f in keys])
            rows = self.get_submodule(f"rows_d{d}")(make_kjt(keys, torch.cat(rows_ids), group_lengths, batch))
            for f in keys:
                j = names.index(f)
                i = self._table_index[j]
                v = rows[f].values().float()
                if not compact and masks is None:  # training the supernet: the thresholds' straight-through mask
                    factors[f] = StraightThroughStep.apply(v.abs().sum(1) - self.threshold[i])
                if f in factors:
                    v = v * factors[f].unsqueeze(1)
                if dims is not None:
                    v = v * (torch.arange(d, device=v.device) < dims[i]).to(v.dtype)
                pooled[f] = bag_sums(v, lengths[j], batch)
        out = [
            nn.functional.pad(pooled[f], (0, full - self.table_dims[self._table_index[j]]))
            if f in pooled
            else features.values().new_zeros((batch, full), dtype=torch.float32)
            for j, (f, full) in enumerate(zip(names, self._length_per_key))
        ]
        return keyed(torch.cat(out, 1), names, self._length_per_key)

    def _remap(self, i: int, ids: torch.Tensor, factors: dict[str, torch.Tensor], f: str) -> torch.Tensor:
        """Retrain/served form: id -> its kept row; pruned ids get factor 0 (a zero vector)."""
        if self.kept_rows[i] == self._tables[i].num_embeddings:  # kept whole: no ids stored
            return ids
        pos, factors[f] = kept_positions(getattr(self, f"kept_ids_{i}"), ids)
        return pos

    # ---- memory and the served form --------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        if self.stage == "retrain":
            return served_bytes(self._tables, self.kept_rows, self.table_dims)
        if self.threshold.is_meta:  # no rows to measure (a meta build): the bound every served form meets
            whole = served_bytes(self._tables, self.kept_rows, [t.embedding_dim for t in self._tables])
            return min(whole, self.target_bytes) if self.target_bytes is not None else whole
        dims = [int(d) for d in self.dims]
        return served_bytes(self._tables, [int(m.sum()) for m in self.keep_masks(dims)], dims)

    def to_serving(self) -> nn.Module:
        if self.stage == "retrain":
            return super().to_serving()
        return self._compact(rewind=False).eval()

    def _compact(self, rewind: bool) -> OptEmbed:
        """The retrain form: the kept rows (trained, or their initial values) at the served dims, and their ids."""
        dims = [int(d) for d in self.dims]
        masks = self.keep_masks(dims)
        config = {**self.config(), "stage": "retrain", "dims": dims, "kept_rows": [int(m.sum()) for m in masks]}
        compact = type(self).from_config(self._tables, config, device=self.device)
        with torch.no_grad():
            for i, mask in enumerate(masks):
                if compact.kept_rows[i] == 0:
                    continue
                source = self.initial_rows(i) if rewind else self.weight(i).detach()
                compact.weight(i).copy_(source[mask][:, : dims[i]])
                if compact.kept_rows[i] < self._tables[i].num_embeddings:
                    getattr(compact, f"kept_ids_{i}").copy_(mask.nonzero().squeeze(1).to(torch.int32))
        return compact

    # ---- stages ------------------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [
            Stage("supernet", description="learn row thresholds; train every candidate dim"),
            Stage("search", max_epochs=0, description="evolutionary search of per-field dims (validation AUC)"),
            Stage("retrain", description="kept rows at the searched dims"),
        ]

    def candidate_dims(self, i: int) -> list[int]:
        return list(range(TBE_DIM_MULTIPLE, self._tables[i].embedding_dim + 1, TBE_DIM_MULTIPLE))

    def regularizer(self) -> torch.Tensor | None:
        return self.alpha * torch.exp(-self.threshold).sum() if self.stage == "supernet" else None

    def stage_parameter_groups(self) -> list[ParameterGroup]:
        if self.stage != "supernet":
            return []
        return [ParameterGroup("thresholds", [self.threshold], optimizer="adam", lr=self.threshold_lr)]

    def on_train_step(self, step: int) -> None:
        """Supernet: draw the next batch's dim per field, uniform over the candidates (seeded by the step)."""
        if self.stage != "supernet":
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        choices = [self.candidate_dims(i) for i in range(len(self._tables))]
        self.active_dims.copy_(torch.tensor([c[int(torch.randint(len(c), (1,), generator=g))] for c in choices]))

    def finish_stage(self, evaluate: Callable[[int | None], float]) -> None:
        """Search stage: the evolutionary search of the dims; the best goes into the ``dims`` buffer."""
        if self.stage != "search":
            return
        from recsys_embed.training.search import evolutionary_search

        def fitness(candidate: tuple[int, ...]) -> float:
            self.dims.copy_(torch.tensor(candidate))
            return evaluate(self.search_batches)

        choices = [self.candidate_dims(i) for i in range(len(self._tables))]
        settings = {k: getattr(self, k) for k in ("mutations", "crossovers", "iterations", "mutation_prob", "keep")}
        result = evolutionary_search(fitness, choices, seed=self.seed, **settings)
        self.dims.copy_(torch.tensor(result.candidate))
        log.info(
            "optembed search: dims %s, val AUC %.5f (best initial %.5f, %d candidates scored), %d bytes, ratio %.2f",
            *(list(result.candidate), result.fitness, result.initial_fitness, result.evaluations),
            *(self.memory_bytes(), self.compression_ratio()),
        )

    def next_stage(self) -> EmbeddingMethod:
        if self.stage == "supernet":
            search = type(self).from_config(self._tables, {**self.config(), "stage": "search"}, device=self.device)
            search.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()})
            return search
        if self.stage == "search":
            return self._compact(rewind=self.retrain_from == "init")
        return super().next_stage()

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> OptEmbed:
        """``target_bytes`` = the budget's bytes; the served forms keep the best rows that fit (see above)."""
        tables = check_tables(tables)
        allowed, smallest = budget.max_bytes(tables), min(served_bytes([t], [1], [TBE_DIM_MULTIPLE]) for t in tables)
        if allowed < smallest:
            raise ValueError(
                f"Method 'optembed' cannot fit {allowed} bytes: one kept row at dim {TBE_DIM_MULTIPLE} and its id take "
                f"{smallest} bytes. Ask for a budget of at least {smallest} bytes."
            )
        return cls(tables, target_bytes=allowed, **options)  # type: ignore[arg-type]

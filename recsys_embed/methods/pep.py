"""``pep``: PEP, learnable soft thresholds prune single entries of the tables; the mask found is retrained (2 stages).

Idea (Liu et al., ICLR'21, "Learnable Embedding Sizes for Recommender Systems", arXiv 2101.07577):

1. ``prune``: every looked-up row passes the soft threshold ``s(v) = sign(v) * relu(|v| - sigmoid(t))``. The
   paper's granularities (``threshold_type``): ``t`` per id and dim (``"feature_dim"``, the paper's best and the
   default), per id (``"feature"``), per table and dim (``"field_dim"``) or per table (``"field"``). ``t`` starts
   very negative (``threshold_init``, the paper's -15 .. -150) and trains in its own Adam group (``threshold_lr``)
   with an L2 decay (``threshold_decay``, the weight decay of the reference code). The decay is what raises the
   thresholds: at ``t = -15`` the loss's gradient on ``t`` carries a factor ``sigmoid'(-15) = 3e-7`` and (for a
   mean loss) falls below Adam's epsilon, the decay's does not, so Adam moves every ``t`` up by about
   ``threshold_lr`` per step until the loss's gradient holds back the entries it needs. A stage of ``S`` steps
   therefore lifts ``sigmoid(t)`` to about ``sigmoid(threshold_init + S * threshold_lr)``.
   After each step the entries with ``|v| > sigmoid(t)`` are counted; at the first step whose count fits the
   budget the mask is fixed: the entries of largest margin ``|v| - sigmoid(t)`` that fill the budget (so the target
   is reached, not overshot). The stage runs its epochs; if the thresholds never reach the target, its end fixes
   the same cut (a magnitude cut of the soft-thresholded table) and logs a warning. No budget: ``|v| > sigmoid(t)``;
2. ``retrain``: the mask fixed, the kept entries rewound to their initial values (lottery ticket, regenerated from
   ``seed``); only they train (a pruned entry is multiplied by 0). The dense layers carry over.

Rows live in TorchRec ``EmbeddingCollection``s (unpooled, one per dim: the threshold acts per entry before
pooling); the method pools itself. The served form holds the kept entries only
(:class:`~recsys_embed.methods.sparse_format.PackedSparseTable`, CSR or COO per table).

Memory: ``sum_t min(nnz_t * (4 + c_t) + n_t * p_t, nnz_t * (4 + r_t + c_t))`` bytes, the smaller of CSR and COO
per table (``c_t``, ``r_t``, ``p_t``: bytes of the smallest int dtypes for a column, a row, a row end). The
budget counts this index overhead; ``compression_ratio()`` reports the ratio reached. Trained forms also hold the
full rows and a bool mask (``training_bytes()``), the prune form also the thresholds (``"feature_dim"``: one
float per entry, as many as the rows) and their Adam state.

Example::

    emb = build_embedding("pep", tables, budget=Budget(ratio=10))  # stages: prune, retrain
    emb = build_embedding("pep", tables, threshold_type="field_dim", threshold_lr=0.05)  # no budget
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import Budget, EmbeddingMethod, ParameterGroup, Stage, check_tables
from recsys_embed.methods.layouts import bag_sums, keyed, make_kjt
from recsys_embed.methods.registry import register
from recsys_embed.methods.row_pruning import initial_rows
from recsys_embed.methods.sparse_format import PackedSparseTable, largest_that_fit, packed_bytes

log = logging.getLogger(__name__)
STAGES = ("prune", "retrain")
THRESHOLD_TYPES = ("feature_dim", "feature", "field_dim", "field")


@register("pep")
class PEP(EmbeddingMethod):
    """PEP: entries pruned by learnt soft thresholds, the mask retrained from the initial values."""

    budget_knobs = ("target_bytes",)
    version = 2  # thresholds per id (feature_dim, feature) as in the paper; per table is field_dim, field

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        stage: Literal["prune", "retrain"] = "prune",
        target_bytes: int | None = None,
        threshold_type: Literal["feature_dim", "feature", "field_dim", "field"] = "feature_dim",
        threshold_init: float = -15.0,
        threshold_lr: float = 1e-3,
        threshold_decay: float = 1e-4,
        kept_entries: list[int] | None = None,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        for t in self._tables:
            if t.num_embeddings >= 2**31:
                raise ValueError(
                    f"Method 'pep': table {t.name!r} has {t.num_embeddings} rows; PEP trains every row of a table "
                    "(and a mask of each entry), so it needs fewer than 2^31 rows: use another method for this table."
                )
        if stage not in STAGES or threshold_type not in THRESHOLD_TYPES:
            raise ValueError(
                f"Method 'pep': stage must be one of {STAGES} (got {stage!r}) and threshold_type one of "
                f"{THRESHOLD_TYPES} (got {threshold_type!r})."
            )
        if threshold_lr <= 0 or threshold_decay < 0:
            raise ValueError(
                f"Method 'pep': threshold_lr must be > 0 and threshold_decay >= 0 (got {threshold_lr}, "
                f"{threshold_decay}); without decay the thresholds barely move from threshold_init."
            )
        if kept_entries is not None and len(kept_entries) != len(self._tables):
            raise ValueError(f"Method 'pep': kept_entries {kept_entries} needs one count per table (the served form).")
        self.stage, self.target_bytes, self.threshold_type = stage, target_bytes, threshold_type
        self.threshold_init, self.threshold_lr, self.seed = threshold_init, threshold_lr, seed
        self.threshold_decay = threshold_decay
        self.kept_entries = kept_entries
        self._cached: list[torch.Tensor] | None = None
        dev = torch.device(device or "cpu")
        if kept_entries is not None:  # the served form: packed kept entries only
            self.packed = nn.ModuleList(
                PackedSparseTable(t.num_embeddings, t.embedding_dim, k, device=dev)
                for t, k in zip(self._tables, kept_entries)
            )
            return
        self._groups: dict[int, list[int]] = {}
        for i, t in enumerate(self._tables):
            self._groups.setdefault(t.embedding_dim, []).append(i)
        for d, members in self._groups.items():
            configs = [
                EmbeddingConfig(name=self._tables[i].name, num_embeddings=self._tables[i].num_embeddings,
                                embedding_dim=d, feature_names=list(self._tables[i].feature_names))
                for i in members
            ]  # fmt: skip
            self.add_tables(f"rows_d{d}", configs, pooled=False, device=dev)
        for i, t in enumerate(self._tables):  # a retrain form keeps every entry until its mask is loaded
            shape = (t.num_embeddings, t.embedding_dim)
            self.register_buffer(f"mask_{i}", torch.full(shape, stage == "retrain", dtype=torch.bool, device=dev))
        self.register_buffer("mask_fixed", torch.tensor(stage == "retrain", device=dev))
        self.register_buffer("reached_step", torch.tensor(-1, device=dev))  # the step the target was reached at
        if stage == "retrain":
            return
        with torch.no_grad():
            for i in range(len(self._tables) if dev.type != "meta" else 0):
                self.weight(i).copy_(self.initial_rows(i))
        per_id, per_dim = threshold_type.startswith("feature"), threshold_type.endswith("_dim")
        self.thresholds = nn.ParameterList(
            torch.full((t.num_embeddings if per_id else 1, t.embedding_dim if per_dim else 1), float(threshold_init),
                       device=dev)
            for t in self._tables
        )  # fmt: skip

    # ---- rows ----------------------------------------------------------------------------------------------------
    def weight(self, i: int) -> torch.Tensor:
        return self.get_submodule(f"rows_d{self._tables[i].embedding_dim}").embeddings[self._tables[i].name].weight

    def initial_rows(self, i: int) -> torch.Tensor:
        """Table ``i``'s rows at initialisation, regenerated from ``seed`` (TorchRec's uniform init)."""
        return initial_rows(self._tables[i], self.seed, i).to(self.device)

    def gate(self, i: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``sigmoid(t)`` of table ``i``, broadcastable to its rows (``ids``: to those rows only)."""
        t = self.thresholds[i]
        return torch.sigmoid(t if ids is None or t.shape[0] == 1 else t[ids])

    def soft(self, i: int, v: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The soft threshold of table ``i``'s rows ``v`` (all rows, or the rows of ``ids``)."""
        return torch.sign(v) * torch.relu(v.abs() - self.gate(i, ids))

    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"mask_{i}") for i in range(len(self._tables))]

    def keep_masks(self, fill: bool = False) -> list[torch.Tensor]:
        """The kept entries: the fixed mask, else the largest margins that fit (``fill``: whatever their sign)."""
        if bool(self.mask_fixed):
            return self.masks()
        if self._cached is not None and not self.training and not fill:
            return self._cached
        with torch.no_grad():
            margins = [self.weight(i).float().abs() - self.gate(i) for i in range(len(self._tables))]
            if self.target_bytes is None:
                kept = [m > 0 for m in margins]
            else:
                kept = largest_that_fit(margins, self.target_bytes, positive_only=not fill)
        if not self.training and not fill:
            self._cached = kept
        return kept

    def train(self, mode: bool = True) -> PEP:
        if mode and self.kept_entries is None and self.stage == "prune":
            self._cached = None
        return super().train(mode)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    # ---- forward -------------------------------------------------------------------------------------------------
    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        batch, names = features.stride(), self._feature_names
        ids = features.values().split(features.length_per_key())
        lengths = features.lengths().view(len(names), -1)
        if self.kept_entries is not None:
            per_feature = [self.packed[self._table_index[j]].rows(ids[j]) for j in range(len(names))]
        else:
            per_feature = self._trained_rows(ids, lengths, batch)
        out = [bag_sums(v, lengths[j], batch) for j, v in enumerate(per_feature)]
        return keyed(torch.cat(out, 1), names, self._length_per_key)

    def _trained_rows(self, ids: Sequence[torch.Tensor], lengths: torch.Tensor, batch: int) -> list[torch.Tensor]:
        names = self._feature_names
        masks = None if (self.training and self.stage == "prune") else self.keep_masks()
        rows: list[torch.Tensor | None] = [None] * len(names)
        for d, members in self._groups.items():
            keys = [f for i in members for f in self._tables[i].feature_names]
            idx = [names.index(f) for f in keys]
            kjt = make_kjt(keys, torch.cat([ids[j] for j in idx]), torch.cat([lengths[j] for j in idx]), batch)
            looked_up = self.get_submodule(f"rows_d{d}")(kjt)
            for f, j in zip(keys, idx):
                i, v = self._table_index[j], looked_up[f].values().float()
                if self.stage == "prune":
                    v = self.soft(i, v, ids[j])
                rows[j] = v if masks is None else v * masks[i][ids[j]].to(v.dtype)
        return rows  # type: ignore[return-value]

    # ---- memory and the served form --------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        shapes = [(t.num_embeddings, t.embedding_dim) for t in self._tables]
        if self.kept_entries is not None:
            return sum(packed_bytes(n, d, k) for (n, d), k in zip(shapes, self.kept_entries))
        if self.mask_fixed.is_meta:  # no rows to measure: the bound every served form meets
            whole = sum(packed_bytes(n, d, n * d) for n, d in shapes)
            return min(whole, self.target_bytes) if self.target_bytes is not None else whole
        return sum(packed_bytes(n, d, int(m.sum())) for (n, d), m in zip(shapes, self.keep_masks()))

    def to_serving(self) -> nn.Module:
        if self.kept_entries is not None:
            return super().to_serving()
        masks = self.keep_masks()
        config = {**self.config(), "kept_entries": [int(m.sum()) for m in masks]}
        served = type(self).from_config(self._tables, config, device=self.device)
        with torch.no_grad():
            for i, mask in enumerate(masks):
                w = self.weight(i).detach().float()
                served.packed[i].pack((self.soft(i, w) if self.stage == "prune" else w) * mask, mask)
        return served.eval()

    # ---- stages ------------------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [
            Stage("prune", description="learn soft thresholds; fix the mask at the target sparsity"),
            Stage("retrain", description="the mask's entries from their initial values"),
        ]

    def stage_parameter_groups(self) -> list[ParameterGroup]:
        if self.stage != "prune" or self.kept_entries is not None:
            return []
        return [
            ParameterGroup("thresholds", list(self.thresholds), optimizer="adam", lr=self.threshold_lr,
                           options={"weight_decay": self.threshold_decay})
        ]  # fmt: skip

    def on_train_step(self, step: int) -> None:
        """Prune: once the entries above their thresholds fit the budget, fix the mask (filling the budget)."""
        if self.stage != "prune" or self.target_bytes is None or bool(self.mask_fixed):
            return
        with torch.no_grad():
            counts = [int((self.weight(i).abs() > self.gate(i)).sum()) for i in range(len(self._tables))]
        if (
            sum(packed_bytes(t.num_embeddings, t.embedding_dim, c) for t, c in zip(self._tables, counts))
            <= self.target_bytes
        ):
            self._fix(self.keep_masks(fill=True))
            self.reached_step.fill_(step)
            log.info("pep: target reached at step %d: %d bytes, ratio %.2f", step, self.memory_bytes(),
                     self.compression_ratio())  # fmt: skip

    def _fix(self, kept: list[torch.Tensor]) -> None:
        for mask, k in zip(self.masks(), kept):
            mask.copy_(k)
        self.mask_fixed.fill_(True)

    def finish_stage(self, evaluate: Callable[[int | None], float]) -> None:
        """Prune: if the thresholds never reached the target, fix the largest margins that fit (logged)."""
        if self.stage != "prune" or bool(self.mask_fixed):
            return
        with torch.no_grad():
            above = sum(int((self.weight(i).abs() > self.gate(i)).sum()) for i in range(len(self._tables)))
        self._fix(self.keep_masks())
        if self.target_bytes is not None:
            total = sum(t.num_embeddings * t.embedding_dim for t in self._tables)
            kept = sum(int(m.sum()) for m in self.masks())
            log.warning(
                "pep: the thresholds did not reach the target in this stage: %.3g%% of the entries are above their "
                "thresholds, the budget keeps %.3g%%; the mask is the largest margins |v| - sigmoid(t) that fit. To "
                "reach it by learning, train the stage longer or raise threshold_lr (the thresholds rise about "
                "threshold_lr per step) or threshold_decay (it outweighs the loss's hold on the entries it reads).",
                100 * above / total, 100 * kept / total,
            )  # fmt: skip
        log.info("pep: mask fixed: %d bytes, ratio %.2f", self.memory_bytes(), self.compression_ratio())

    def next_stage(self) -> EmbeddingMethod:
        if self.stage != "prune" or self.kept_entries is not None:
            return super().next_stage()
        kept = self.keep_masks()
        retrain = type(self).from_config(self._tables, {**self.config(), "stage": "retrain"}, device=self.device)
        with torch.no_grad():
            retrain.reached_step.copy_(self.reached_step)
            for i, k in enumerate(kept):
                retrain.masks()[i].copy_(k)
                retrain.weight(i).copy_(self.initial_rows(i).to(retrain.weight(i).dtype) * k)
        return retrain

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> PEP:
        """``target_bytes`` = the budget's bytes (index overhead included)."""
        tables = check_tables(tables)
        allowed = budget.max_bytes(tables)
        smallest = min(packed_bytes(t.num_embeddings, t.embedding_dim, 1) for t in tables)
        if allowed < smallest:
            raise ValueError(
                f"Method 'pep' cannot fit {allowed} bytes: one kept entry and its indices take {smallest} bytes. "
                f"Ask for a budget of at least {smallest} bytes."
            )
        return cls(tables, target_bytes=allowed, **options)  # type: ignore[arg-type]

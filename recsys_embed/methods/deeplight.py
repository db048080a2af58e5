"""``deeplight``: DeepLight, gradual magnitude pruning of embedding entries to a target sparsity, served sparse.

Idea (Deng et al., WSDM'21, "DeepLight: Deep Lightweight Feature Interactions for Accelerating CTR Predictions in Ad
Serving", arXiv 2002.06987), in the VLDB'24 embedding compression benchmark's form (Zhang et al.):

1. ``warmup``: dense training of full tables;
2. ``prune``: every ``prune_every`` (10) steps the ``round((1 - s) * N)`` entries of largest magnitude over all
   tables together are kept (one cut, as the benchmark prunes its one concatenated table: small, often-read tables
   keep their entries, rare rows of large tables go), ``N`` every table's entries,
   ``s = target_sparsity * (1 - 0.99^(step / 100))``; masked entries give zero and stay zero (the forward multiplies
   by the mask, so their gradient is zero, and the mask is re-applied to the weights after each step). The schedule
   only approaches the target, so the stage ends with one prune to exactly the target (:meth:`finish_stage`): the
   largest entries that fit ``target_bytes`` (a budget), else ``target_sparsity``;
3. ``finetune``: the kept entries train with the mask fixed.

Rows are plain parameters of the method (not TorchRec collections): fused TBE tables update inside backward, where
a mask cannot be re-applied before the next lookup; plain tables (method-owned: neither fused nor sharded) get their
own optimizer (``rows_optimizer``, ``rows_lr``: Adagrad 0.05, like the fused tables' default). Their gradients are
dense by default, so any optimizer a user puts on ``parameters()`` takes them; ``sparse_grad=True`` gives only the
batch's rows (less work per step on large tables; Adagrad and SGD only). Adagrad's
accumulators are buffers of the method (``adagrad_i``, scaling each gradient in a hook before an SGD step: exactly
Adagrad), so they carry over from stage to stage like one continuous run; a stage's fresh Adagrad would give every
entry a first step of ``rows_lr`` again and undo the warm-up (measured: val AUC 0.784 -> 0.753 over the finetune).
The masks are buffers (``mask_i``), so checkpoints (resume) hold them.

Memory: ``sum_t min(nnz_t * (4 + col_t) + n_t * ptr_t, nnz_t * (4 + row_t + col_t))``

(CSR or COO, whichever is smaller, ints at the smallest dtype that fits: :mod:`sparse_format`), ``nnz_t``
table ``t``'s share of the target's kept entries. Every form serves (and evaluates) its entries cut to the target by
magnitude; after the ``prune`` stage that cut is its mask. A budget gives ``target_bytes`` (the final cut, index
overhead included) and the schedule's ``target_sparsity`` (the sparsity at which every table keeping the same share
would fit); ``compression_ratio()`` reports the ratio reached.

Example::

    emb = build_embedding("deeplight", tables, budget=Budget(ratio=10))  # stages: warmup, prune, finetune
    emb = build_embedding("deeplight", tables, target_sparsity=0.9)  # no budget: 10% of the entries kept
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import Budget, EmbeddingMethod, ParameterGroup, Stage, check_tables
from recsys_embed.methods.layouts import bag_sums, keyed
from recsys_embed.methods.registry import register
from recsys_embed.methods.row_pruning import initial_rows
from recsys_embed.methods.sparse_format import PackedSparseTables, largest_that_fit, packed_bytes
from recsys_embed.methods.storage import TableOptions, TableStorage

log = logging.getLogger(__name__)
STAGES = ("warmup", "prune", "finetune")
SPARSE_GRAD_OPTIMIZERS = ("adagrad", "sgd")  # torch optimizers that update from sparse gradients


def scheduled_sparsity(step: int, target: float) -> float:
    """The benchmark's gradual schedule: ``target * (1 - 0.99^(step / 100))``."""
    return target * (1.0 - 0.99 ** (step / 100.0))


def kept_entries(table: EmbeddingBagConfig, sparsity: float) -> int:
    """Entries a table keeps at ``sparsity`` if every table kept the same share (at least one)."""
    return max(1, int(round((1.0 - sparsity) * table.num_embeddings * table.embedding_dim)))


def magnitudes(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``|w|`` of the masked-in entries, -1 for pruned ones (so no cut brings them back)."""
    return [torch.where(m, w.detach().abs(), -1.0) for w, m in zip(weights, masks)]


def largest_entries(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """One cut over every table: masks of the ``keep`` masked-in entries of largest magnitude (exactly ``keep``, or
    every masked-in entry if fewer; ties broken by position)."""
    flat = torch.cat([m.reshape(-1) for m in magnitudes(weights, masks)])
    kept = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    kept[torch.topk(flat, min(keep, flat.numel()), sorted=False).indices] = True
    kept &= flat >= 0
    return [k.view_as(m) for k, m in zip(kept.split([m.numel() for m in masks]), masks)]


@register("deeplight")
class DeepLight(EmbeddingMethod):
    """DeepLight: dense warm-up, gradual magnitude pruning of entries to a target sparsity, sparse serving."""

    budget_knobs = ("target_sparsity", "target_bytes")
    version = 2  # one magnitude cut over all tables (version 1: the same share per table)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        stage: Literal["warmup", "prune", "finetune"] = "warmup",
        target_sparsity: float = 0.9,
        target_bytes: int | None = None,
        prune_every: int = 10,
        rows_optimizer: str = "adagrad",
        rows_lr: float = 0.05,
        sparse_grad: bool = False,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        for t in self._tables:
            if t.num_embeddings * t.embedding_dim >= 2**31:
                raise ValueError(
                    f"Method 'deeplight': table {t.name!r} has {t.num_embeddings} x {t.embedding_dim} entries; its "
                    "dense warm-up trains every entry in one plain tensor (under 2^31 entries): use another method."
                )
        if stage not in STAGES or not 0.0 <= target_sparsity < 1.0 or prune_every < 1:
            raise ValueError(
                f"Method 'deeplight': stage must be one of {STAGES}, target_sparsity in [0, 1) and prune_every >= 1 "
                f"(got {stage!r}, {target_sparsity}, {prune_every})."
            )
        self.stage, self.target_sparsity, self.prune_every, self.seed = stage, target_sparsity, prune_every, seed
        self.target_bytes = target_bytes
        if sparse_grad and rows_optimizer not in SPARSE_GRAD_OPTIMIZERS:
            raise ValueError(
                f"Method 'deeplight': sparse_grad=True needs rows_optimizer in {SPARSE_GRAD_OPTIMIZERS} (torch's "
                f"{rows_optimizer!r} takes dense gradients only); drop sparse_grad or change rows_optimizer."
            )
        self.rows_optimizer, self.rows_lr, self.sparse_grad = rows_optimizer, rows_lr, sparse_grad
        dev = torch.device(device or "cpu")
        self.weights = nn.ParameterList()
        for i, t in enumerate(self._tables):
            w = torch.empty(t.num_embeddings, t.embedding_dim, device=dev)
            if dev.type != "meta":
                w.copy_(initial_rows(t, seed, i))
            self.weights.append(nn.Parameter(w))
            everything = torch.ones(t.num_embeddings, t.embedding_dim, dtype=torch.bool, device=dev)
            self.register_buffer(f"mask_{i}", everything)
            if rows_optimizer == "adagrad":
                self.register_buffer(f"adagrad_{i}", torch.zeros(t.num_embeddings, t.embedding_dim, device=dev))
                self.weights[i].register_hook(partial(self._adagrad_scaled, i))
        self.register_buffer("at_target", torch.tensor(False, device=dev))  # the mask is the final cut
        # declared method-owned: neither fused nor sharded; their own optimizer trains them, the method masks them
        self.declare_storage(TableStorage("weights", tuple(self._tables), options=TableOptions(method_owned=True)))
        self._served_masks: list[torch.Tensor] | None = None

    def mask(self, i: int) -> torch.Tensor:
        return getattr(self, f"mask_{i}")

    def _adagrad_scaled(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """Adagrad on table ``i``'s sparse gradient: add ``g^2`` to the rows' accumulators, give ``g / sqrt(sum)``
        (the SGD step at ``rows_lr`` then is Adagrad's step)."""
        accumulator = getattr(self, f"adagrad_{i}")
        if not grad.is_sparse:
            accumulator.add_(grad.square())
            return grad / (accumulator.sqrt() + 1e-10)
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        accumulator.index_add_(0, rows, values.square())
        scaled = values / (accumulator[rows].sqrt() + 1e-10)
        return torch.sparse_coo_tensor(grad.indices(), scaled, grad.shape, is_coalesced=True)

    def masks(self) -> list[torch.Tensor]:
        return [self.mask(i) for i in range(len(self._tables))]

    def target_masks(self) -> list[torch.Tensor]:
        """Per table, the served entries: the mask's entries cut to the target by magnitude (cached in eval)."""
        if bool(self.at_target):
            return self.masks()
        if self._served_masks is not None and not self.training:
            return self._served_masks
        with torch.no_grad():
            if self.target_bytes is not None:
                masks = largest_that_fit(magnitudes(self.weights, self.masks()), self.target_bytes, positive_only=True)
            else:
                total = sum(t.num_embeddings * t.embedding_dim for t in self._tables)
                masks = largest_entries(self.weights, self.masks(), max(1, round((1 - self.target_sparsity) * total)))
        self._served_masks = None if self.training else masks
        return masks

    def train(self, mode: bool = True) -> DeepLight:
        self._served_masks = None
        return super().train(mode)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._served_masks = None
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    # ---- forward -------------------------------------------------------------------------------------------------
    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        batch, names = features.stride(), self._feature_names
        ids = features.values().split(features.length_per_key())
        lengths = features.lengths().view(len(names), -1)
        masks = [self.mask(i) for i in range(len(self._tables))] if self.training else self.target_masks()
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.training and torch.is_grad_enabled() and self.rows_optimizer == "adagrad" and several:
            raise ValueError(
                "Method 'deeplight' keeps its rows' Adagrad state in each process (its rows are method-owned, not "
                "sharded), so ranks would drift apart: train it on one process, or set rows_optimizer to 'sgd' or "
                "'adam' (the data-parallel wrapper averages their gradients)."
            )
        out = []
        for j in range(len(names)):
            i, bag_ids = self._table_index[j], ids[j]
            rows = F.embedding(bag_ids, self.weights[i], sparse=self.sparse_grad)
            rows = rows * masks[i][bag_ids]
            out.append(bag_sums(rows, lengths[j], batch))
        return keyed(torch.cat(out, 1), names, self._length_per_key)

    # ---- memory and the served form --------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        shapes = [(t.num_embeddings, t.embedding_dim) for t in self._tables]
        if self.at_target.is_meta:  # no weights to cut: the bound every served form meets
            keep = max(1, round((1 - self.target_sparsity) * sum(n * d for n, d in shapes)))
            bound = sum(packed_bytes(n, d, min(keep, n * d)) for n, d in shapes)
            return min(bound, self.target_bytes) if self.target_bytes is not None else bound
        return sum(packed_bytes(n, d, int(m.sum())) for (n, d), m in zip(shapes, self.target_masks()))

    def sparsity(self) -> float:
        """The current mask's share of zeroed entries (all tables)."""
        total = sum(t.num_embeddings * t.embedding_dim for t in self._tables)
        return 1.0 - sum(int(self.mask(i).sum()) for i in range(len(self._tables))) / total

    def to_serving(self) -> nn.Module:
        with torch.no_grad():
            masks = self.target_masks()
            masked = [w.detach() * m for w, m in zip(self.weights, masks)]
        return PackedSparseTables(self._tables, masked, method=self.name, masks=masks).eval()

    # ---- stages ------------------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [
            Stage("warmup", description="dense training"),
            Stage("prune", description="gradual magnitude pruning, then exactly the target"),
            Stage("finetune", description="the kept entries, mask fixed"),
        ]

    def stage_parameter_groups(self) -> list[ParameterGroup]:
        """The rows train with their own optimizer (default Adagrad 0.05, as fused tables would), not the dense one;
        Adagrad is an SGD step on the gradients its hook scaled (its state lives in the method)."""
        optimizer = "sgd" if self.rows_optimizer == "adagrad" else self.rows_optimizer
        return [ParameterGroup("rows", list(self.weights), optimizer=optimizer, lr=self.rows_lr)]

    def prune_to(self, sparsity: float) -> None:
        """Keep the entries of largest magnitude over all tables at ``sparsity`` (never regrowing pruned ones)."""
        total = sum(t.num_embeddings * t.embedding_dim for t in self._tables)
        self._keep(largest_entries(self.weights, self.masks(), max(1, round((1 - sparsity) * total))))

    def _keep(self, kept: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for i, k in enumerate(kept):
                self.mask(i).copy_(k)
                self.weights[i].mul_(k)
        self._served_masks = None

    def on_train_step(self, step: int) -> None:
        """Prune: every ``prune_every`` steps the schedule's sparsity; prune and finetune: re-apply the mask."""
        if self.stage == "warmup":
            return
        if self.stage == "prune" and step % self.prune_every == 0:
            self.prune_to(scheduled_sparsity(step, self.target_sparsity))
            return
        with torch.no_grad():
            for i in range(len(self._tables)):
                self.weights[i].mul_(self.mask(i))

    def finish_stage(self, evaluate: Callable[[int | None], float]) -> None:
        """Prune stage: one last prune to exactly the target (the schedule approaches it only asymptotically)."""
        if self.stage != "prune":
            return
        self._keep(self.target_masks())
        self.at_target.fill_(True)
        log.info(
            "deeplight: sparsity %.4f (target %.4f), %d bytes, ratio %.2f",
            *(self.sparsity(), self.target_sparsity, self.memory_bytes(), self.compression_ratio()),
        )

    def next_stage(self) -> EmbeddingMethod:
        if self.stage == "finetune":
            return super().next_stage()
        following = STAGES[STAGES.index(self.stage) + 1]
        form = type(self).from_config(self._tables, {**self.config(), "stage": following}, device=self.device)
        form.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()})
        return form

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> DeepLight:
        """``target_bytes`` = the budget's bytes; the schedule's ``target_sparsity``: the lowest at which every
        table keeping the same share would fit (index overhead included; bisection)."""
        tables = check_tables(tables)
        allowed = budget.max_bytes(tables)

        def fits(sparsity: float) -> bool:
            nbytes = (packed_bytes(t.num_embeddings, t.embedding_dim, kept_entries(t, sparsity)) for t in tables)
            return sum(nbytes) <= allowed

        low, high = 0.0, 1.0 - 1e-12  # high: one entry per table
        if not fits(high):
            smallest = sum(packed_bytes(t.num_embeddings, t.embedding_dim, 1) for t in tables)
            raise ValueError(
                f"Method 'deeplight' cannot fit {allowed} bytes: one kept entry per table takes {smallest} bytes. Ask "
                f"for a budget of at least {smallest} bytes."
            )
        if fits(low):
            high = low
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        return cls(tables, target_sparsity=high, target_bytes=allowed, **options)  # type: ignore[arg-type]

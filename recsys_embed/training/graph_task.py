"""``GraphTask``: the LightningModule that trains LightGCN, NGCF or MF-BPR over any compression method with BPR.

Loss (as NGCF and LightGCN): ``BPR = mean softplus(s(u, j) - s(u, i))`` over the batch's (user, positive ``i``,
negative ``j``) triples, plus ``l2 * (|e_u|^2 + |e_i|^2 + |e_j|^2) / 2 / B`` on the batch's *ego* embeddings
(layer 0, the method's rows), plus the method's own regularizer if its stage has one. Every step reads all user
and item rows once (the method's all-rows lookup) and propagates them over the graph the data module built.

Optimizers: by default every parameter, the tables' rows included, is trained by the dense optimizer (Adam, lr
0.001, the papers' setting: each step touches every row, so the rows' gradients are dense anyway). With
``sparse_optimizer`` set, the method's row tables are fused into fbgemm kernels that apply that optimizer inside
backward (rowwise Adagrad on CPU: fbgemm has no CPU Adam), and the dense optimizer drives the rest.

Evaluation: full ranking of every item for each user with held-out items, the user's train items excluded;
``val``/``test`` ``recall@K`` and ``ndcg@K`` for each ``K`` in ``top_k`` (see :mod:`recsys_embed.training.ranking`),
users scored in chunks of the data module's ``eval_users``.

Example::

    data = GraphDataModule("data/ml100k_graph")
    task = GraphTask(data.num_users, data.num_items, embedding=EmbeddingSpec("hash", Budget(ratio=10)))
    Trainer(max_epochs=50, inference_mode=False).fit(task, datamodule=data)
    task = GraphTask.load_from_checkpoint(path, model=NGCF)  # the model factory is not saved: pass it (default
    # LightGCN); the method is rebuilt from the saved embedding spec (its budget solve is deterministic)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from recsys_embed.data.graph_datamodule import BPRBatch, GraphDataModule, RankingBatch
from recsys_embed.methods import (
    EmbeddingMethod,
    SparseOptimizer,
    build_embedding,
    dense_parameters,
    fuse_tables,
    method_class,
)
from recsys_embed.methods.fused import FusedTables
from recsys_embed.methods.saving import describe
from recsys_embed.models.graph_base import NODE, GraphModel, graph_tables
from recsys_embed.models.lightgcn import LightGCN
from recsys_embed.training import sharded_state
from recsys_embed.training.ranking import ranking_metrics
from recsys_embed.training.task_config import (
    DESCRIPTION_FORMAT,
    EmbeddingSpec,
    as_sparse_optimizer,
    as_spec,
    check_description,
    default_optimizer,
    describe_model_factory,
    group_optimizer,
)

log = logging.getLogger(__name__)

GraphModelFactory = Callable[[EmbeddingMethod, int, int], GraphModel]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class GraphTask(pl.LightningModule):
    """BPR training and full-ranking evaluation of ``model(embedding, num_users, num_items)``.

    Args:
        num_users: ``U``; num_items: ``I`` (linked from the data module in the CLI).
        embedding_dim: dim of the user and item tables (the papers: 64).
        embedding: the compression method (registered name, budget or options).
        model: a graph model class or factory called as ``model(embedding, num_users, num_items)``.
        shared_table: one logical ``node`` table (users, then items at offset ``U``) instead of two.
        l2: weight of the L2 term on the batch's ego embeddings (the papers: 1e-4).
        optimizer: factory of the dense optimizer (default Adam, lr 0.001).
        sparse_optimizer: fuse the row tables with this optimizer (``None``: the dense optimizer trains them).
        top_k: the cut-offs of Recall@K and NDCG@K; the first is shown in the progress bar.
        id_counts: per-feature id counts for frequency-aware methods (the CLI links the train degrees).
        description: what built a saved task (LightningCLI passes a checkpoint's, with ``--ckpt_path``); the task is
            built from its other arguments, and a checkpoint of another model or method form is an error on load.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        embedding: EmbeddingSpec = EmbeddingSpec(),
        model: GraphModelFactory = LightGCN,
        shared_table: bool = False,
        l2: float = 1e-4,
        optimizer: OptimizerFactory = default_optimizer,
        sparse_optimizer: SparseOptimizer | None = None,
        top_k: list[int] = [20],  # noqa: B006 - jsonargparse reads the default
        id_counts: Mapping[str, np.ndarray] | None = None,
        description: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer", "id_counts"])
        if not top_k or min(top_k) < 1:
            raise ValueError(f"top_k must list positive cut-offs, e.g. [20] (got {top_k}).")
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0 (got {l2}).")
        embedding = as_spec(embedding)
        self.sparse_optimizer = None if sparse_optimizer is None else as_sparse_optimizer(sparse_optimizer)
        self.tables = graph_tables(num_users, num_items, embedding_dim, shared=shared_table)
        method = self._build_method(embedding, id_counts)
        self.net = model(method, num_users, num_items)
        self.model_factory = model
        self.hparams["description"] = self.describe()  # what built the net: checked when a checkpoint loads
        # a stage with its own parameter groups (a search, a pruning stage) optimizes manually, as in CTRTask
        self.automatic_optimization = not method.stage_parameter_groups()
        self.optimizer_factory = optimizer
        self.num_users, self.num_items, self.l2, self.top_k = num_users, num_items, l2, list(top_k)
        self.metrics = nn.ModuleDict(
            {f"{split}_{name}": MeanMetric() for split in ("val", "test") for name in self._metric_names()}
        )
        self._scored: tuple[torch.Tensor, torch.Tensor] | None = None
        log.info(
            "Embedding %r: %d bytes, ratio %.2f against full fp32 tables (%d bytes)",
            method.name,
            method.memory_bytes(),
            method.compression_ratio(),
            method.full_bytes(),
        )

    def _metric_names(self) -> list[str]:
        return [f"{m}@{k}" for k in self.top_k for m in ("recall", "ndcg")]

    def _build_method(self, spec: EmbeddingSpec, id_counts: Mapping[str, np.ndarray] | None) -> EmbeddingMethod:
        options = dict(spec.options)
        if method_class(spec.method).needs_id_counts and "id_counts" not in options:
            if id_counts is None:
                raise ValueError(
                    f"Method {spec.method!r} needs id counts: pass id_counts (the CLI links the data's train "
                    "degrees) or id_counts in model.embedding.options."
                )
            if NODE in {t.name for t in self.tables}:
                id_counts = {NODE: np.concatenate([id_counts["user"], id_counts["item"]])}
            options["id_counts"] = dict(id_counts)
        return build_embedding(spec.method, self.tables, budget=spec.budget, **options)

    @property
    def embedding(self) -> EmbeddingMethod:
        return self.net.embedding

    # ---- setup -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Take the graph from the trainer's :class:`GraphDataModule` (unless one was set already)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.net.adjacency is None and isinstance(datamodule, GraphDataModule):
            if (datamodule.num_users, datamodule.num_items) != (self.num_users, self.num_items):
                raise ValueError(
                    f"The data has {datamodule.num_users} users and {datamodule.num_items} items, the task "
                    f"{self.num_users} and {self.num_items}: build the task from this data."
                )
            self.net.set_graph(datamodule.adjacency)

    def configure_model(self) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            raise ValueError("GraphTask trains on one process (the whole graph each step); set trainer.devices 1.")
        if self.sparse_optimizer is not None and self._trainer is not None:
            fuse_tables(self.net, self.sparse_optimizer, self.trainer.strategy.root_device)

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer] | None:
        """The dense optimizer; with stage parameter groups, one more optimizer per group (manual optimization).
        ``None`` when every parameter is a fused row (LightGCN/MF-BPR with ``sparse_optimizer``): Lightning then
        runs backward, which steps the fused tables, and counts the step."""
        groups = self.embedding.stage_parameter_groups()
        owned = {id(p) for group in groups for p in group.params}
        params = [p for p in dense_parameters(self) if id(p) not in owned]
        optimizers = [self.optimizer_factory(params)] if params else []
        optimizers += [group_optimizer(group, self.embedding.name) for group in groups]
        if groups:
            return optimizers
        return optimizers[0] if optimizers else None

    # ---- training --------------------------------------------------------------------------------------------
    def bpr_loss(self, batch: BPRBatch) -> dict[str, torch.Tensor]:
        """``{"bpr", "l2", "loss"}`` of one batch (propagating every node once)."""
        users, items, ego = self.net()
        u, i, j = batch.users, batch.positives, batch.negatives
        user_rows = users[u]
        difference = (user_rows * items[j]).sum(1) - (user_rows * items[i]).sum(1)
        bpr = F.softplus(difference).mean()
        offset = self.num_users
        squares = ego[u].pow(2).sum() + ego[offset + i].pow(2).sum() + ego[offset + j].pow(2).sum()
        l2 = squares / 2 / len(u)
        loss = bpr + self.l2 * l2
        regularizer = self.embedding.regularizer()
        if regularizer is not None:
            loss = loss + regularizer
        return {"bpr": bpr, "l2": l2, "loss": loss}

    def training_step(self, batch: BPRBatch, batch_idx: int) -> torch.Tensor:
        losses = self.bpr_loss(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch))
        if not self.automatic_optimization:
            optimizers = self.optimizers()
            optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
            for opt in optimizers:
                opt.zero_grad()
            self.manual_backward(losses["loss"])
            step = self.trainer.global_step
            optimizers[0].step()  # counted: one global step per batch
            for opt in optimizers[1:]:
                opt.optimizer.step()
            self.embedding.on_train_step(step)
        return losses["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        step = self.trainer.global_step
        super().optimizer_step(*args, **kwargs)
        self.embedding.on_train_step(step)

    def on_train_epoch_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def _propagated(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scored is None:
            with torch.no_grad():
                users, items, _ = self.net()
            self._scored = (users, items)
        return self._scored

    def _evaluate(self, batch: RankingBatch, split: str) -> None:
        users, items = self._propagated()
        scores = users[batch.users] @ items.T
        for name, values in ranking_metrics(scores, batch.exclude, batch.targets, self.top_k).items():
            metric = self.metrics[f"{split}_{name}"]
            metric.update(values)
            self.log(f"{split}/{name}", metric, prog_bar=name == f"recall@{self.top_k[0]}", batch_size=len(batch))

    def on_validation_epoch_start(self) -> None:
        self._scored = None

    def on_test_epoch_start(self) -> None:
        self._scored = None

    def on_validation_epoch_end(self) -> None:
        self._scored = None

    def on_test_epoch_end(self) -> None:
        self._scored = None

    def validation_step(self, batch: RankingBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: RankingBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Plain hyperparameters, and the fused tables' optimizer state (it lives in fbgemm)."""
        hparams = checkpoint.setdefault("hyper_parameters", {})
        for key, value in hparams.items():
            if isinstance(value, (EmbeddingSpec, SparseOptimizer)):
                hparams[key] = asdict(value)
        fused = {name: m.optimizer_state() for name, m in self.named_modules() if isinstance(m, FusedTables)}
        if fused:
            checkpoint["fused_optimizer_state"] = fused

    def describe(self) -> dict[str, Any]:
        """The graph model's class and options and the method's name, version, tables, config and stage."""
        return {
            "format": DESCRIPTION_FORMAT,
            "model": describe_model_factory(self.model_factory),
            "method": {**describe(self.embedding), "stage": self.embedding.stage},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another model or method form is a clear error; then the fused optimizer state."""
        check_description(
            checkpoint.get("hyper_parameters", {}).get("description"),
            self.describe,
            self.tables,
            reload_hint="test it with the config that trained it (its run folder's config.yaml), or "
            "GraphTask.load_from_checkpoint(path, model=<its model class>)",
        )
        saved = checkpoint.get("fused_optimizer_state")
        if saved and any(isinstance(m, FusedTables) for m in self.modules()):
            sharded_state.load_fused_optimizer_state(self, saved)
        elif saved:
            log.info("Checkpoint has fused optimizer state but the tables are not fused: state not restored.")

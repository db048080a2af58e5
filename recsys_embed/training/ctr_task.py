"""``CTRTask``: the LightningModule that trains any CTR model over any compression method.

Loss is binary cross-entropy on logits; validation and test report AUC and log loss. Dense parameters are updated
by the configured PyTorch optimizer; embedding rows are updated inside backward by the fused sparse optimizer of
fbgemm's table-batched kernels (set by ``sparse_optimizer``, logged at start).

Checkpoints are self-described (:mod:`recsys_embed.training.task_config`): ``CTRTask.load_from_checkpoint(path)``
rebuilds the net, whatever model built it, without solving a budget or reading id counts.

Staged methods: the current stage's :meth:`~recsys_embed.methods.EmbeddingMethod.regularizer` is added to the
training loss, :meth:`~recsys_embed.methods.EmbeddingMethod.on_train_step` is called after each optimizer step, and
:meth:`~recsys_embed.methods.EmbeddingMethod.stage_parameter_groups` get their own optimizers (then the task
optimizes manually); :meth:`CTRTask.advance_stage` swaps in the next stage's form (see
:mod:`recsys_embed.training.stages`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from torchrec.distributed.model_parallel import DistributedModelParallel

from recsys_embed.data.batches import Batch
from recsys_embed.data.schema import load_id_counts
from recsys_embed.methods import (
    EmbeddingMethod,
    SparseOptimizer,
    build_embedding,
    dense_parameters,
    fuse_tables,
    method_class,
)
from recsys_embed.methods.fused import FusedTables
from recsys_embed.methods.saving import check_same_tables, describe, rebuild
from recsys_embed.models import DLRM
from recsys_embed.training import sharded_state
from recsys_embed.training.distributed_checkpoint import (
    consolidated_checkpoint,
    is_sharded_checkpoint,
    sharded_checkpoint_error,
)
from recsys_embed.training.strategy import TorchRecStrategy
from recsys_embed.training.task_config import (
    DESCRIPTION_FORMAT,
    EmbeddingSpec,
    as_sparse_optimizer,
    as_spec,
    check_description,
    default_optimizer,
    describe_model_factory,
    group_optimizer,
    model_factory_from,
    tables_for,
)

log = logging.getLogger(__name__)

ModelFactory = Callable[[EmbeddingMethod, int], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class CTRTask(pl.LightningModule):
    """Binary CTR training of ``model(embedding, num_dense)``.

    Args:
        cardinalities: categorical feature -> number of ids (linked from the data module in the CLI).
        num_dense: number of dense features (linked from the data module).
        embedding_dim: dim of every logical table.
        embedding: the compression method (registered name, budget or options).
        model: a model class or factory called as ``model(embedding_module, num_dense)``.
        sparse_optimizer: the optimizer fused into the embedding tables.
        optimizer: factory of the dense optimizer.
        id_counts_dir: folder with the data's ``id_counts.npz`` (linked from the data module), read only by
            frequency-aware methods.
        description: what built a saved task (set by :meth:`load_from_checkpoint` and ``recsys-embed
            test/validate --ckpt_path``; not meant to be written by hand). When given, the model and the method's
            form are rebuilt from it (``embedding`` and ``model`` are not used; no budget is solved, no id counts
            read), after checking that its tables are the ones ``cardinalities`` and ``embedding_dim`` give.

    Example::

        task = CTRTask.load_from_checkpoint("runs/x/checkpoints/last.ckpt")  # any model, any method
    """

    def __init__(
        self,
        cardinalities: dict[str, int],
        num_dense: int,
        embedding_dim: int = 16,
        embedding: EmbeddingSpec = EmbeddingSpec(),
        model: ModelFactory = DLRM,
        sparse_optimizer: SparseOptimizer = SparseOptimizer(),
        optimizer: OptimizerFactory = default_optimizer,
        id_counts_dir: str | None = None,
        description: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer"])
        embedding, sparse_optimizer = as_spec(embedding), as_sparse_optimizer(sparse_optimizer)
        self.tables = tables_for(cardinalities, embedding_dim)
        self.embedding_spec = embedding
        if description is not None:
            method, model = self._from_description(description, model)
        else:
            method = self._build_method(embedding, id_counts_dir)
        self._method = [method]  # a plain reference: the module is registered once, inside self.net
        self.model_factory = model
        self.net = model(method, num_dense)
        self.sparse_optimizer = sparse_optimizer
        self.optimizer_factory = optimizer
        self._settings = {  # what builds a task like this one for another checkpoint (see from_checkpoint)
            "cardinalities": cardinalities,
            "num_dense": num_dense,
            "embedding_dim": embedding_dim,
            "embedding": embedding,
            "model": model,
            "sparse_optimizer": sparse_optimizer,
            "optimizer": optimizer,
            "id_counts_dir": id_counts_dir,
        }
        self.hparams["description"] = self.describe()
        self.val_auc, self.test_auc = BinaryAUROC(), BinaryAUROC()
        self.val_logloss, self.test_logloss = MeanMetric(), MeanMetric()
        self._pending_optimizer_state: tuple[dict[str, Any], dict[str, Any]] | None = None  # saved, column shards
        self._set_optimization_mode()
        self._log_embedding()

    def _set_optimization_mode(self) -> None:
        """A stage with its own parameter groups optimizes manually; set before fit, so that Lightning checks the
        Trainer's settings against it (gradient clipping and accumulation need automatic optimization)."""
        self.automatic_optimization = not self.embedding.stage_parameter_groups()

    def _build_method(self, embedding: EmbeddingSpec, id_counts_dir: str | None) -> EmbeddingMethod:
        options = dict(embedding.options)
        if method_class(embedding.method).needs_id_counts and "id_counts" not in options:
            if id_counts_dir is None:
                raise ValueError(
                    f"Method {embedding.method!r} needs the data's id counts: set model.id_counts_dir (the CLI links "
                    "it from data.data_dir) or pass id_counts in model.embedding.options."
                )
            options["id_counts"] = load_id_counts(id_counts_dir)
        return build_embedding(embedding.method, self.tables, budget=embedding.budget, **options)

    def _from_description(
        self, description: dict[str, Any], model: ModelFactory
    ) -> tuple[EmbeddingMethod, ModelFactory]:
        if description.get("format") != DESCRIPTION_FORMAT:
            raise ValueError(
                f"CTRTask(description=...) takes what a checkpoint's hyper_parameters['description'] holds "
                f"(format {DESCRIPTION_FORMAT!r}); got format {description.get('format')!r}."
            )
        saved = description["method"]
        check_same_tables(saved["tables"], self.tables, "the checkpoint")
        method = rebuild(saved)
        if method.stage != saved["stage"]:
            raise ValueError(
                f"Method {saved['name']!r} rebuilt from its config is in stage {method.stage!r}, the checkpoint in "
                f"{saved['stage']!r}: a staged method must take its stage as an option (so config() records it)."
            )
        if description.get("model") is not None:
            model = model_factory_from(description["model"])
        log.info(
            "Rebuilt from a checkpoint: model %s, method %r version %s (stage %r, config %s)",
            (description.get("model") or {}).get("class", "given by model="),
            saved["name"],
            saved["version"],
            saved["stage"],
            saved["config"],
        )
        return method, model

    def _log_embedding(self) -> None:
        log.info(
            "Embedding %r (stage %r): %d bytes, ratio %.2f against full fp32 tables (%d bytes)",
            self.embedding.name,
            self.embedding.stage,
            self.embedding.memory_bytes(),
            self.embedding.compression_ratio(),
            self.embedding.full_bytes(),
        )

    @property
    def embedding(self) -> EmbeddingMethod:
        """The compression method (a submodule of ``net``)."""
        return self._method[0]

    # ---- self-description ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What rebuilds this task's net (plain types): the model's class and init args (``None`` for a factory
        that cannot be described), the method's name, class version, tables, resolved config and stage."""
        model = describe_model_factory(self.model_factory)
        if model is None and not getattr(self, "_warned_factory", False):
            self._warned_factory = True
            log.warning(
                "Model factory %r is not an importable class (or a partial of one) with plain options: checkpoints "
                "will need model= to reload.",
                self.model_factory,
            )
        return {
            "format": DESCRIPTION_FORMAT,
            "model": model,
            "method": {**describe(self.embedding), "stage": self.embedding.stage},
        }

    def from_checkpoint(self, path: str | Path) -> CTRTask:
        """A task with this one's settings (optimizers, sparse optimizer) and the net ``path`` describes, its
        weights loaded (no optimizer or loop state: ``Trainer.fit(ckpt_path=...)`` restores those)."""
        saved = consolidated_checkpoint(path)  # a sharded checkpoint's tables read from its shards folder
        description = saved.get("hyper_parameters", {}).get("description")
        if description is None:
            raise ValueError(f"{path} has no model/method description: it was not written by this CTRTask version.")
        task = type(self)(**self._settings, description=description)
        task.load_state_dict(saved["state_dict"])
        return task

    def advance_stage(self) -> None:
        """Replace the method by its next stage's form (:meth:`EmbeddingMethod.next_stage`); the next ``fit``
        fuses its tables and builds fresh optimizers."""
        if isinstance(self.net, DistributedModelParallel):
            raise ValueError(
                "Cannot build the next stage inside sharded tables: rebuild the task from the stage's final "
                "checkpoint (CTRTask.from_checkpoint) and advance that one."
            )
        old = self.embedding
        trained = old.next_stage()
        # a plain (unfused) form with the trained weights, as a resumed run rebuilds it from the stage checkpoint:
        # the next fit fuses it afresh, with fresh optimizer state, whether next_stage() built a new module or not
        new = type(trained).from_config(trained.embedding_bag_configs(), trained.config(), device=trained.device)
        new.load_state_dict(trained.state_dict())
        parent, _, name = next(path for path, module in self.net.named_modules() if module is old).rpartition(".")
        setattr(self.net.get_submodule(parent) if parent else self.net, name, new)
        self._method = [new]
        self._set_optimization_mode()
        self._pending_optimizer_state = None  # the previous stage's fused optimizer state does not carry over
        self.hparams["description"] = self.describe()
        log.info("Method %r: stage %r -> %r", old.name, old.stage, new.stage)
        self._log_embedding()

    # ---- training --------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1 and not isinstance(strategy, TorchRecStrategy):
            raise ValueError(
                f"Training on {self.trainer.world_size} processes with strategy {type(strategy).__name__} would give "
                "every rank its own copy of the fused embedding tables (they update inside backward, outside DDP), "
                "so the ranks would drift apart silently. Use --trainer.strategy torchrec (Python: "
                "Trainer(strategy='torchrec')), which shards the tables across the ranks."
            )
        # every loop takes the Trainer's inference_mode (Trainer._evaluation_loop is undefined while predicting)
        if self.trainer.predict_loop.inference_mode:
            raise ValueError(
                "Fused embedding tables cannot run under torch.inference_mode (fbgemm has no CPU kernel for it): "
                "create the Trainer with inference_mode=False (the recsys-embed CLI does)."
            )
        if not isinstance(strategy, TorchRecStrategy):  # that strategy shards (and fuses) the tables
            fuse_tables(self.net, self.sparse_optimizer, strategy.root_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(batch.dense_features, batch.sparse_features)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch.labels)
        sync = self.trainer.world_size > 1
        regularizer = self.embedding.regularizer()
        if regularizer is not None:
            self.log("train/bce", loss, batch_size=len(batch.labels), sync_dist=sync)
            self.log("train/regularizer", regularizer, batch_size=len(batch.labels), sync_dist=sync)
            loss = loss + regularizer
        # with several ranks, log the global batch's loss (the mean of the ranks' equal shares)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch.labels), sync_dist=sync)
        if not self.automatic_optimization:  # the stage has its own parameter groups (see configure_optimizers)
            optimizers = self.optimizers()
            optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
            for opt in optimizers:
                opt.zero_grad()
            self.manual_backward(loss)
            step = self.trainer.global_step
            optimizers[0].step()  # counted: one global step per batch, as with automatic optimization
            for opt in optimizers[1:]:
                opt.optimizer.step()
            self.embedding.on_train_step(step)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step as Lightning does, then call the method's per-step hook (``step`` counts from 0 within the stage,
        each stage having its own Trainer) before any callback sees the batch's end (checkpoints include it)."""
        step = self.trainer.global_step
        super().optimizer_step(*args, **kwargs)
        self.embedding.on_train_step(step)

    def _evaluate(self, batch: Batch, auc: BinaryAUROC, logloss: MeanMetric, stage: str) -> None:
        logits = self(batch)
        losses = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        auc.update(torch.sigmoid(logits), batch.labels.long())
        logloss.update(losses)
        self.log(f"{stage}/auc", auc, prog_bar=True, batch_size=len(batch.labels))
        self.log(f"{stage}/logloss", logloss, prog_bar=True, batch_size=len(batch.labels))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_auc, self.val_logloss, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_auc, self.test_logloss, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The click probability of each row (the sigmoid of the logit)."""
        return torch.sigmoid(self(batch))

    def on_train_epoch_start(self) -> None:
        """Give a streaming train dataset the epoch, so its seeded shuffle differs per epoch."""
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the description of the net's current form, and the fused tables' optimizer state (it lives in
        fbgemm, outside Lightning's optimizers) unless the strategy writes it with each rank's shards."""
        hparams = checkpoint.setdefault("hyper_parameters", {})
        for key, value in hparams.items():  # plain dicts, as LightningCLI writes them (CTRTask takes both)
            if isinstance(value, (EmbeddingSpec, SparseOptimizer)):
                hparams[key] = asdict(value)
        hparams["description"] = self.describe()
        if isinstance(self.net, DistributedModelParallel):  # a collective: every rank gets here
            if not getattr(self.trainer.strategy, "writes_shards", False):  # else the strategy writes each rank's
                gathered = sharded_state.gather_optimizer_state(self.net, prefix="net.")  # + column shards' own
                checkpoint["fused_optimizer_state"], checkpoint["fused_optimizer_column_shards"] = gathered
            return
        checkpoint["fused_optimizer_state"] = {
            name: module.optimizer_state() for name, module in self.named_modules() if isinstance(module, FusedTables)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the fused optimizer state: now if the tables are fused or sharded, at ``on_fit_start`` if they
        are yet to be. A checkpoint of another model or method form than this task's, or one whose tables are in
        a shards folder without the torchrec strategy to load it, is a clear error."""
        if is_sharded_checkpoint(checkpoint):  # TorchRecStrategy.load_checkpoint takes these
            raise sharded_checkpoint_error(checkpoint)
        saved_description = checkpoint.get("hyper_parameters", {}).get("description")
        check_description(saved_description, self.describe, self.tables)
        saved = checkpoint.get("fused_optimizer_state", {})
        column_shards = checkpoint.get("fused_optimizer_column_shards", {})
        self._pending_optimizer_state = None
        if saved and isinstance(self.net, DistributedModelParallel):
            sharded_state.load_sharded_optimizer_state(self.net, saved, prefix="net.", column_shards=column_shards)
        elif saved and any(isinstance(module, FusedTables) for module in self.modules()):
            sharded_state.load_fused_optimizer_state(self, saved)
        elif saved:
            self._pending_optimizer_state = (saved, column_shards)

    def on_fit_start(self) -> None:
        pending, self._pending_optimizer_state = self._pending_optimizer_state, None
        if pending and isinstance(self.net, DistributedModelParallel):
            sharded_state.load_sharded_optimizer_state(self.net, pending[0], prefix="net.", column_shards=pending[1])
        elif pending:
            log.info("Checkpoint has fused optimizer state but the tables are not fused: state not restored.")
        log.info("Sparse optimizer (fused in the tables): %s", asdict(self.sparse_optimizer))
        for logger in self.loggers:
            logger.log_hyperparams(
                {
                    "embedding/memory_bytes": self.embedding.memory_bytes(),
                    "embedding/ratio": self.embedding.compression_ratio(),
                }
            )

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        """The dense optimizer; with stage parameter groups, one more optimizer per group (those parameters leave
        the dense one) and manual optimization."""
        groups = self.embedding.stage_parameter_groups()
        if not groups:
            return self.optimizer_factory(dense_parameters(self))
        owned = {id(p) for group in groups for p in group.params}
        dense = self.optimizer_factory([p for p in dense_parameters(self) if id(p) not in owned])
        optimizers = [dense]
        for group in groups:
            optimizers.append(group_optimizer(group, self.embedding.name))
            log.info(
                "Stage %r: parameter group %r, %s (lr %g)", self.embedding.stage, group.name, group.optimizer, group.lr
            )
        return optimizers

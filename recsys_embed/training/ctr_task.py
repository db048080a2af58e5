"""``CTRTask``: the LightningModule that trains any CTR model over any compression method.

Loss is binary cross-entropy on logits; validation and test report AUC and log loss. Dense parameters are updated
by the configured PyTorch optimizer; embedding rows are updated inside backward by the fused sparse optimizer of
fbgemm's table-batched kernels (set by ``sparse_optimizer``, logged at start).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagConfig
from torchrec.distributed.model_parallel import DistributedModelParallel

from recsys_embed.data.batches import Batch
from recsys_embed.data.schema import load_id_counts
from recsys_embed.methods import (
    Budget,
    EmbeddingMethod,
    SparseOptimizer,
    build_embedding,
    dense_parameters,
    fuse_tables,
    method_class,
)
from recsys_embed.methods.fused import FusedTables
from recsys_embed.models import DLRM
from recsys_embed.training.sharding import consolidated_optimizer_state, load_sharded_optimizer_state
from recsys_embed.training.strategy import TorchRecStrategy

log = logging.getLogger(__name__)

ModelFactory = Callable[[EmbeddingMethod, int], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class EmbeddingSpec:
    """Which compression method to build, and either its budget or its explicit options.

    Example (YAML)::

        embedding:
          method: hash
          budget: {ratio: 10}
    """

    method: str = "full"
    budget: Budget | None = None
    options: dict[str, Any] = field(default_factory=dict)


# Checkpoints store these in their hyperparameters; allow them for torch.load(weights_only=True) (Lightning's default).
torch.serialization.add_safe_globals([EmbeddingSpec, Budget, SparseOptimizer])


def tables_for(cardinalities: dict[str, int], embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One logical table ``t_{feature}`` per categorical feature."""
    return [
        EmbeddingBagConfig(name=f"t_{name}", num_embeddings=n, embedding_dim=embedding_dim, feature_names=[name])
        for name, n in cardinalities.items()
    ]


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.tables = tables_for(cardinalities, embedding_dim)
        self.embedding_spec = embedding
        options = dict(embedding.options)
        if method_class(embedding.method).needs_id_counts and "id_counts" not in options:
            if id_counts_dir is None:
                raise ValueError(
                    f"Method {embedding.method!r} needs the data's id counts: set model.id_counts_dir (the CLI links "
                    "it from data.data_dir) or pass id_counts in model.embedding.options."
                )
            options["id_counts"] = load_id_counts(id_counts_dir)
        method = build_embedding(embedding.method, self.tables, budget=embedding.budget, **options)
        self._method = [method]  # a plain reference: the module is registered once, inside self.net
        self.net = model(method, num_dense)
        self.sparse_optimizer = sparse_optimizer
        self.optimizer_factory = optimizer
        self.val_auc, self.test_auc = BinaryAUROC(), BinaryAUROC()
        self.val_logloss, self.test_logloss = MeanMetric(), MeanMetric()
        self._pending_optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None
        log.info(
            "Embedding %r: %d bytes, ratio %.2f against full fp32 tables (%d bytes)",
            embedding.method,
            self.embedding.memory_bytes(),
            self.embedding.compression_ratio(),
            self.embedding.full_bytes(),
        )

    @property
    def embedding(self) -> EmbeddingMethod:
        """The compression method (a submodule of ``net``)."""
        return self._method[0]

    def configure_model(self) -> None:
        if self._trainer is None:
            return
        loop = getattr(self.trainer, "_evaluation_loop", None)
        if getattr(loop, "inference_mode", False):
            raise ValueError(
                "Fused embedding tables cannot run under torch.inference_mode (fbgemm has no CPU kernel for it): "
                "create the Trainer with inference_mode=False (the recsys-embed CLI does)."
            )
        if not isinstance(self.trainer.strategy, TorchRecStrategy):  # that strategy shards (and fuses) the tables
            fuse_tables(self.net, self.sparse_optimizer, self.trainer.strategy.root_device)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(batch.dense, batch.sparse)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch.labels)
        # with several ranks, log the global batch's loss (the mean of the ranks' equal shares)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=self.trainer.world_size > 1)
        return loss

    def _evaluate(self, batch: Batch, auc: BinaryAUROC, logloss: MeanMetric, stage: str) -> None:
        logits = self(batch)
        losses = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        auc.update(torch.sigmoid(logits), batch.labels.long())
        logloss.update(losses)
        self.log(f"{stage}/auc", auc, prog_bar=True, batch_size=len(batch))
        self.log(f"{stage}/logloss", logloss, prog_bar=True, batch_size=len(batch))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_auc, self.val_logloss, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_auc, self.test_logloss, "test")

    def on_train_epoch_start(self) -> None:
        """Give a streaming train dataset the epoch, so its seeded shuffle differs per epoch."""
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the fused tables' optimizer state (it lives in fbgemm, outside Lightning's optimizers)."""
        if isinstance(self.net, DistributedModelParallel):  # a collective: every rank gets here
            checkpoint["fused_optimizer_state"] = consolidated_optimizer_state(self.net, prefix="net.")
            return
        checkpoint["fused_optimizer_state"] = {
            name: module.optimizer_state() for name, module in self.named_modules() if isinstance(module, FusedTables)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the fused optimizer state: now if the tables are fused (resuming ``fit`` on one process), at
        ``on_fit_start`` if the sharding strategy has yet to shard them."""
        saved = checkpoint.get("fused_optimizer_state", {})
        fused = {name: module for name, module in self.named_modules() if isinstance(module, FusedTables)}
        for name, state in saved.items():
            if name in fused:
                fused[name].load_optimizer_state(state)
        self._pending_optimizer_state = saved if saved and not fused else None

    def on_fit_start(self) -> None:
        pending, self._pending_optimizer_state = self._pending_optimizer_state, None
        if pending and isinstance(self.net, DistributedModelParallel):
            load_sharded_optimizer_state(self.net, pending, prefix="net.")
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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(dense_parameters(self))

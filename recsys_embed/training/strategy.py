"""``TorchRecStrategy``: Lightning training with TorchRec-sharded embedding tables (``--trainer.strategy torchrec``).

Lightning's ``ddp`` wraps the whole LightningModule in DDP, which breaks on sharded tables, and
``ModelParallelStrategy`` feeds every rank the same batches and cannot checkpoint ``DistributedModelParallel``.
This strategy keeps DDP's process handling (launching, process group: gloo on CPU, NCCL on CUDA, ``torchrun``
and multi-node environments) and replaces the model wrapping:

* ``module.net`` is planned by TorchRec's planner and wrapped in ``DistributedModelParallel``, in every stage
  (fit/validate/test): the methods' declared tables (pooled and unpooled) are sharded, each with its declared
  precision and its optimizer (its override, else the module's ``sparse_optimizer``) fused in; dense layers are
  data-parallel (see :func:`~recsys_embed.training.sharding.shard_model`);
* the data module slices each global batch per rank (see ``ParquetBatches``), so every rank gets its own rows and
  the same number of batches;
* checkpoints are consolidated on rank 0 with the unsharded model's keys and the fused optimizer state in one
  process's layout (plus column shards' own row-wise accumulators), so they load exactly on any number of ranks
  and any sharding plan (and without this strategy); see ``training/sharded_state.py``.

Any LightningModule with a ``net`` (the model holding the TorchRec tables) and a ``sparse_optimizer``
(:class:`~recsys_embed.methods.SparseOptimizer`) works; :class:`~recsys_embed.training.CTRTask` is one.

Example::

    recsys-embed fit --config experiments/ctr/synthetic_dlrm.yaml --trainer.strategy torchrec --trainer.devices 2
    trainer = Trainer(strategy=TorchRecStrategy(sharding_types=["table_wise"]), accelerator="cpu", devices=2)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn import Module
from torchrec.distributed.model_parallel import DistributedModelParallel

from recsys_embed.methods.storage import SparseOptimizer
from recsys_embed.training.sharding import (
    allowed_sharding_types,
    consolidated_state_dict,
    load_sharded_state,
    shard_model,
)

log = logging.getLogger(__name__)


class TorchRecStrategy(DDPStrategy):
    """Shards ``module.net``'s embedding tables with TorchRec; replicates the rest with DDP.

    Args:
        sharding_types: the sharding types TorchRec's planner may choose from, each applied to the tables it can
            shard (default, pooled tables: ``table_wise``, ``column_wise``, ``table_column_wise``, plus
            ``row_wise``/``table_row_wise`` on CUDA; unpooled tables: ``table_wise``, ``column_wise``,
            ``row_wise``).
        memory_cap_bytes: table storage per rank the planner may use (host memory on CPU, HBM on CUDA); default:
            the planner's own topology defaults. A plan that does not fit fails on every rank with its message.
        column_shard_dim: the width of column-wise shards (a multiple of 4 dividing the tables' dims; default
            TorchRec's 128, so narrower tables stay whole under column-wise sharding).
        process_group_backend, timeout, start_method: as for Lightning's ``DDPStrategy`` (default backend: gloo on
            CPU, NCCL on CUDA).
    """

    strategy_name = "torchrec"

    def __init__(
        self,
        sharding_types: list[str] | None = None,
        memory_cap_bytes: int | None = None,
        column_shard_dim: int | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method)
        if memory_cap_bytes is not None and memory_cap_bytes <= 0:
            raise ValueError(f"memory_cap_bytes must be positive (got {memory_cap_bytes}).")
        self.sharding_types = sharding_types
        self.memory_cap_bytes = memory_cap_bytes
        self.column_shard_dim = column_shard_dim

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        net, optimizer = getattr(module, "net", None), getattr(module, "sparse_optimizer", None)
        if not isinstance(net, Module) or not isinstance(optimizer, SparseOptimizer):
            raise TypeError(
                f"The torchrec strategy shards `module.net` with `module.sparse_optimizer`; {type(module).__name__} "
                "lacks them. Use recsys_embed's CTRTask, or give your LightningModule both attributes."
            )
        if not isinstance(net, DistributedModelParallel):  # a second stage (e.g. test after fit) reuses the shards
            allowed_sharding_types(self.root_device.type, self.sharding_types, pooled=None)  # fail early
            module.net = shard_model(
                net,
                optimizer,
                device=self.root_device,
                sharding_types=self.sharding_types,
                memory_cap_bytes=self.memory_cap_bytes,
                column_shard_dim=self.column_shard_dim,
            )
        self.model_to_device()  # after sharding: the whole tables never sit on one device
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The whole model on rank 0 (sharded tables gathered), with an unsharded model's keys."""
        return consolidated_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        if isinstance(getattr(module, "net", None), DistributedModelParallel):
            load_sharded_state(module, checkpoint["state_dict"])
        else:  # not sharded yet: load as usual, setup() shards the loaded weights
            super().load_model_state_dict(checkpoint, strict=strict)


StrategyRegistry.register(
    TorchRecStrategy.strategy_name,
    TorchRecStrategy,
    description="TorchRec-sharded embedding tables (DistributedModelParallel) with data-parallel dense layers",
)

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
* checkpoints on several ranks (``checkpoint_format="sharded"``, the default) are the ``.ckpt`` file (dense
  layers, loops, optimizers; written by rank 0) and a ``<ckpt>.shards-<token>/`` folder beside it (named in the
  file, a new one each save, the old one deleted once the file is in place) where every rank writes only its own
  shards of the tables and their fused optimizer state (``torch.distributed.checkpoint``, see
  ``training/distributed_checkpoint.py``); ``checkpoint_format="consolidated"`` (and one rank) gathers the tables
  into the one file instead (``training/sharded_state.py``). Either loads on any number of ranks and any sharding
  plan (weights exactly; a column-split row-wise optimizer state exactly for the same split, else as the
  width-weighted mean); a one-file checkpoint also without this strategy.

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
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.nn import Module
from torchrec.distributed.model_parallel import DistributedModelParallel

from recsys_embed.methods.storage import SparseOptimizer
from recsys_embed.training.distributed_checkpoint import (
    SHARDS_KEY,
    check_sharded_layout,
    load_dense_state,
    load_sharded_checkpoint,
    remove_checkpoint,
    remove_stale_shards,
    save_checkpoint_shards,
)
from recsys_embed.training.sharding import (
    allowed_sharding_types,
    consolidated_state_dict,
    load_sharded_state,
    shard_model,
)

log = logging.getLogger(__name__)
#: set in a loaded checkpoint whose shards folder :meth:`TorchRecStrategy.load_checkpoint` already loaded
_LOADED = "sharded_tables_loaded"


class TorchRecStrategy(DDPStrategy):
    """Shards ``module.net``'s embedding tables with TorchRec; replicates the rest with DDP.

    Args:
        sharding_types: the sharding types TorchRec's planner may choose from, each applied to the tables it can
            shard (default, pooled tables: ``table_wise``, ``column_wise``, ``table_column_wise``, plus
            ``row_wise``/``table_row_wise`` on CUDA; unpooled tables: ``table_wise``, ``column_wise``,
            ``row_wise``).
        memory_cap_bytes: table storage per rank the planner may use (host memory on CPU, HBM on CUDA); default:
            the planner's own topology defaults. A plan that does not fit fails on every rank with its message.
        checkpoint_format: ``"sharded"`` (every rank writes its own shards into ``<ckpt>.shards-<token>/``; one rank:
            the same as consolidated) or ``"consolidated"`` (rank 0 gathers the whole model into the file).
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
        checkpoint_format: Literal["sharded", "consolidated"] = "sharded",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method)
        if memory_cap_bytes is not None and memory_cap_bytes <= 0:
            raise ValueError(f"memory_cap_bytes must be positive (got {memory_cap_bytes}).")
        self.sharding_types = sharding_types
        self.memory_cap_bytes = memory_cap_bytes
        if checkpoint_format not in ("sharded", "consolidated"):
            raise ValueError(f"checkpoint_format must be 'sharded' or 'consolidated' (got {checkpoint_format!r}).")
        self.column_shard_dim = column_shard_dim
        self.checkpoint_format = checkpoint_format

    @property
    def writes_shards(self) -> bool:
        """Whether checkpoints keep the tables in a shards folder, each rank writing its own."""
        return self.checkpoint_format == "sharded" and self.world_size > 1

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Checkpoints load into the shards (so a sharded checkpoint's tables never sit whole on one rank)."""
        return True

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
        if self.writes_shards and trainer.state.fn == TrainerFn.FITTING:  # fail now, not at the first checkpoint
            check_sharded_layout(module.net)
        self.model_to_device()  # after sharding: the whole tables never sit on one device
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The dense entries if the tables go to a shards folder; else the whole model on rank 0 (sharded tables
        gathered), with an unsharded model's keys."""
        if self.writes_shards:
            return {k: v for k, v in self.lightning_module.state_dict().items() if not isinstance(v, ShardedTensor)}
        return consolidated_state_dict(self.lightning_module)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """With sharded checkpoints, every rank first writes its shards into a new ``<filepath>.shards-<token>/``,
        then rank 0 the file naming it; only then are the previous folder and any left by a crashed save deleted,
        so a crash at any point leaves a file and the folder it names."""
        if not self.writes_shards:
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        checkpoint[SHARDS_KEY] = save_checkpoint_shards(self.lightning_module.net, filepath, prefix="net.")
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if self.is_global_zero:
            remove_stale_shards(filepath, keep=checkpoint[SHARDS_KEY])

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the file; a sharded checkpoint's tables and fused optimizer state go straight into the shards."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        folder = checkpoint.pop(SHARDS_KEY, None)
        if folder is not None:
            load_sharded_checkpoint(self.lightning_module.net, Path(checkpoint_path).with_name(folder), prefix="net.")
            checkpoint[_LOADED] = True
        return checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_checkpoint(filepath)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        if checkpoint.get(_LOADED):  # the tables came from the shards folder: the file holds the dense entries
            load_dense_state(module, checkpoint["state_dict"])
        elif isinstance(getattr(module, "net", None), DistributedModelParallel):
            load_sharded_state(module, checkpoint["state_dict"])
        else:  # not sharded yet: load as usual, setup() shards the loaded weights
            super().load_model_state_dict(checkpoint, strict=strict)


StrategyRegistry.register(
    TorchRecStrategy.strategy_name,
    TorchRecStrategy,
    description="TorchRec-sharded embedding tables (DistributedModelParallel) with data-parallel dense layers",
)

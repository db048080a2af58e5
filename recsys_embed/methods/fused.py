"""Fused sparse training: turn a method's plain TorchRec tables into fbgemm table-batched kernels.

A fused table applies its optimizer inside backward (fbgemm TBE), so the rows never get a dense gradient. This is
the fast path for training on one process; with several processes the TorchRec sharding strategy does the same
through ``DistributedModelParallel``. Lightning's optimizer then drives only the dense parameters
(see :func:`dense_parameters`).

Example::

    emb = build_embedding("full", tables)
    model = DLRM(emb, num_dense=13)
    fuse_tables(model, SparseOptimizer(name="rowwise_adagrad", lr=0.05))
    dense_opt = torch.optim.Adam(dense_parameters(model), lr=1e-3)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.fused import FusedOptimizerModule

from recsys_embed.methods.base import TBE_DIM_MULTIPLE

log = logging.getLogger(__name__)

_FBGEMM_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}


@dataclass
class SparseOptimizer:
    """The optimizer fused into the embedding tables (applied inside backward by fbgemm).

    ``rowwise_adagrad`` keeps one accumulator per row (the DLRM default); ``adagrad`` one per element; ``sgd``
    none; ``adam`` two per element (CUDA only: fbgemm's CPU kernels have no Adam).
    """

    name: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in _FBGEMM_OPTIMIZERS:
            raise ValueError(f"Unknown sparse optimizer {self.name!r}; choose one of {sorted(_FBGEMM_OPTIMIZERS)}.")
        if self.lr <= 0:
            raise ValueError(f"Sparse optimizer lr must be positive (got {self.lr}).")


def fbgemm_fused_params(optimizer: SparseOptimizer) -> dict[str, object]:
    """fbgemm's keyword arguments for ``optimizer`` (also TorchRec's sharder ``fused_params``)."""
    params: dict[str, object] = {"optimizer": _FBGEMM_OPTIMIZERS[optimizer.name], "learning_rate": optimizer.lr}
    if optimizer.name != "sgd":
        params["eps"] = optimizer.eps
    return params


def check_fusable(tables: list[EmbeddingBagConfig], optimizer: SparseOptimizer, device: torch.device) -> None:
    """fbgemm's limits, as clear errors: no CPU Adam, dims in multiples of ``TBE_DIM_MULTIPLE``."""
    if optimizer.name == "adam" and device.type != "cuda":
        raise ValueError("Sparse optimizer 'adam' needs CUDA (fbgemm has no CPU Adam); use 'rowwise_adagrad' on CPU.")
    for table in tables:
        if table.embedding_dim % TBE_DIM_MULTIPLE:
            raise ValueError(
                f"Table {table.name!r} has embedding_dim {table.embedding_dim}: fbgemm's table-batched kernels "
                f"need a multiple of {TBE_DIM_MULTIPLE}; change the dim (or the method's dim options)."
            )


class FusedTables(nn.Module):
    """fbgemm's table-batched embedding bags with a fused optimizer, behind the ``EmbeddingBagCollection`` API.

    One ``SplitTableBatchedEmbeddingBagsCodegen`` serves all tables: the KJT's values and offsets go to it as they
    are (no per-feature split), and backward applies the optimizer to the rows read. Each table's rows are exposed
    as ``embedding_bags.{table}.weight`` (views of the kernel's storage), so state dicts match a plain EBC's.
    """

    def __init__(
        self, tables: list[EmbeddingBagConfig], optimizer: SparseOptimizer, device: torch.device | None = None
    ) -> None:
        super().__init__()
        device = device or torch.device("cpu")
        on_gpu = device.type == "cuda"
        location = EmbeddingLocation.DEVICE if on_gpu else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if on_gpu else ComputeDevice.CPU
        kernel = SplitTableBatchedEmbeddingBagsCodegen(
            [(t.num_embeddings, t.embedding_dim, location, compute) for t in tables],
            feature_table_map=[i for i, t in enumerate(tables) for _ in t.feature_names],
            pooling_mode=PoolingMode.SUM,
            device=device,
            **fbgemm_fused_params(optimizer),
        )
        self._kernel = [kernel]  # not a registered child: its state is exposed through embedding_bags below
        self._tables = list(tables)
        self._keys = [f for t in tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self.embedding_bags = nn.ModuleDict()
        for table, weight in zip(tables, kernel.split_embedding_weights()):
            holder = nn.Module()
            holder.register_parameter("weight", nn.Parameter(weight))
            self.embedding_bags[table.name] = holder

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._tables

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The fused optimizer's per-table state (e.g. row-wise Adagrad accumulators), copied, for checkpoints."""
        states = self._kernel[0].split_optimizer_states()
        return {
            f"{t.name}.{i}": state.detach().clone()
            for t, table in zip(self._tables, states)
            for i, state in enumerate(table)
        }

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`optimizer_state` saved (same tables and optimizer)."""
        states = self._kernel[0].split_optimizer_states()
        expected = {f"{t.name}.{i}" for t, table in zip(self._tables, states) for i, _ in enumerate(table)}
        if set(state) != expected:
            raise ValueError(
                f"Fused optimizer state has entries {sorted(state)}, these tables expect {sorted(expected)}: the "
                "checkpoint was written with other tables or another sparse optimizer."
            )
        with torch.no_grad():
            for t, table in zip(self._tables, states):
                for i, current in enumerate(table):
                    current.copy_(state[f"{t.name}.{i}"])

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.keys() != self._keys:
            features = features.permute([features.keys().index(k) for k in self._keys])
        values = features.values()
        pooled = self._kernel[0](indices=values, offsets=features.offsets().to(values.dtype))
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=pooled)


def fuse_tables(module: nn.Module, optimizer: SparseOptimizer, device: torch.device | None = None) -> int:
    """Replace every ``EmbeddingBagCollection`` below ``module`` by :class:`FusedTables`, keeping the weights.

    Returns the number of collections fused. State-dict keys are unchanged, so checkpoints load either way.
    """
    fused = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not EmbeddingBagCollection:
                continue
            target = device or next(child.parameters()).device
            check_fusable(child.embedding_bag_configs(), optimizer, target)
            replacement = FusedTables(child.embedding_bag_configs(), optimizer, target)
            replacement.load_state_dict(child.state_dict())
            setattr(parent, child_name, replacement)
            fused += 1
    if fused:
        log.info("Fused %d embedding collection(s) with sparse optimizer %s", fused, optimizer)
    return fused


def sparse_parameter_ids(module: nn.Module) -> set[int]:
    """ids of the parameters whose optimizer is fused in backward: :class:`FusedTables` and TorchRec's sharded
    tables (any ``FusedOptimizerModule`` below the ``DistributedModelParallel`` wrapper)."""
    ids: set[int] = set()
    for child in module.modules():
        fused_by_torchrec = isinstance(child, FusedOptimizerModule) and not isinstance(child, DistributedModelParallel)
        if isinstance(child, FusedTables) or fused_by_torchrec:
            ids.update(id(p) for p in child.parameters())
    return ids


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters the dense (Lightning/PyTorch) optimizer must update: everything but fused tables."""
    skip = sparse_parameter_ids(module)
    return [p for p in module.parameters() if id(p) not in skip and p.requires_grad]

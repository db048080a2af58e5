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

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec import EmbeddingBagConfig, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.fused import FusedOptimizerModule

from recsys_embed.methods.base import TBE_DIM_MULTIPLE, EmbeddingMethod
from recsys_embed.methods.storage import SparseOptimizer, TableOptions

log = logging.getLogger(__name__)

_FBGEMM_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}
_FBGEMM_PRECISION = {"fp32": SparseType.FP32, "fp16": SparseType.FP16}


def fbgemm_fused_params(optimizer: SparseOptimizer) -> dict[str, object]:
    """fbgemm's keyword arguments for ``optimizer`` (also TorchRec's sharder ``fused_params``)."""
    params: dict[str, object] = {"optimizer": _FBGEMM_OPTIMIZERS[optimizer.name], "learning_rate": optimizer.lr}
    if optimizer.name != "sgd":
        params["eps"] = optimizer.eps
    return params


def check_fusable(
    tables: list[EmbeddingBagConfig] | list[EmbeddingConfig],
    optimizer: SparseOptimizer,
    device: torch.device,
    pooled: bool = True,
) -> None:
    """fbgemm's limits, as clear errors: no CPU Adam, dims in multiples of ``TBE_DIM_MULTIPLE``, one dim for all
    unpooled tables of a kernel."""
    if optimizer.name == "adam" and device.type != "cuda":
        raise ValueError("Sparse optimizer 'adam' needs CUDA (fbgemm has no CPU Adam); use 'rowwise_adagrad' on CPU.")
    for table in tables:
        if table.embedding_dim % TBE_DIM_MULTIPLE:
            raise ValueError(
                f"Table {table.name!r} has embedding_dim {table.embedding_dim}: fbgemm's table-batched kernels "
                f"need a multiple of {TBE_DIM_MULTIPLE}; change the dim (or the method's dim options)."
            )
    dims = {t.embedding_dim for t in tables}
    if not pooled and len(dims) > 1:
        raise ValueError(
            f"Unpooled tables {[t.name for t in tables]} have dims {sorted(dims)}: fbgemm's sequence kernels need "
            "one dim; declare each dim as its own group of tables."
        )


class FusedTables(nn.Module):
    """fbgemm's table-batched embeddings with a fused optimizer, behind TorchRec's collection APIs.

    One ``SplitTableBatchedEmbeddingBagsCodegen`` serves all tables: the KJT's values and offsets go to it as they
    are (no per-feature split), and backward applies the optimizer to the rows read. Pooled tables behave as an
    ``EmbeddingBagCollection`` (rows exposed as ``embedding_bags.{table}.weight``), unpooled ones as an
    ``EmbeddingCollection`` (``embeddings.{table}.weight``, output ``dict[str, JaggedTensor]``); the weights are
    views of the kernel's storage, so state dicts match the plain collection's. Fuse on the final device: a later
    ``.to(other_device)`` or ``.half()`` gives the parameters new storage that the kernel does not train (fusing
    again from the plain form is the way to move).
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig] | list[EmbeddingConfig],
        optimizer: SparseOptimizer,
        device: torch.device | None = None,
        *,
        pooled: bool = True,
        options: TableOptions = TableOptions(),
    ) -> None:
        super().__init__()
        device = device or torch.device("cpu")
        on_gpu = device.type == "cuda"
        location = EmbeddingLocation.DEVICE if on_gpu else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if on_gpu else ComputeDevice.CPU
        kernel = SplitTableBatchedEmbeddingBagsCodegen(
            [(t.num_embeddings, t.embedding_dim, location, compute) for t in tables],
            feature_table_map=[i for i, t in enumerate(tables) for _ in t.feature_names],
            pooling_mode=PoolingMode.SUM if pooled else PoolingMode.NONE,
            device=device,
            weights_precision=_FBGEMM_PRECISION[options.precision],
            stochastic_rounding=options.stochastic_rounding,
            **fbgemm_fused_params(optimizer),
        )
        self._kernel = [kernel]  # not a registered child: its state is exposed through embedding_bags below
        self._tables = list(tables)
        self.pooled = pooled
        self._keys = [f for t in tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        rows = nn.ModuleDict()
        for table, weight in zip(tables, kernel.split_embedding_weights()):
            holder = nn.Module()
            holder.register_parameter("weight", nn.Parameter(weight))
            rows[table.name] = holder
        self.add_module("embedding_bags" if pooled else "embeddings", rows)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._tables  # type: ignore[return-value]

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return self._tables  # type: ignore[return-value]

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

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor | dict[str, JaggedTensor]:
        if features.keys() != self._keys:
            features = features.permute([features.keys().index(k) for k in self._keys])
        values = features.values()
        out = self._kernel[0](indices=values, offsets=features.offsets().to(values.dtype))
        if self.pooled:
            return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=out)
        rows = out.view(-1, self._dims[0]) if out.dim() == 1 else out
        lengths = features.lengths().view(len(self._keys), -1)
        pieces = rows.split(features.length_per_key())
        return {k: JaggedTensor(values=v, lengths=n) for k, v, n in zip(self._keys, pieces, lengths.unbind(0))}


def fuse_tables(module: nn.Module, optimizer: SparseOptimizer, device: torch.device | None = None) -> int:
    """Replace the declared tables of every method below ``module`` by :class:`FusedTables`, keeping the weights.

    Acts on each method's :meth:`~recsys_embed.methods.base.EmbeddingMethod.storage` declarations: pooled and
    unpooled tables alike, each with its own precision and optimizer override; method-owned tables are left to
    the method. Returns the number of collections fused (already fused ones are skipped). State-dict keys are
    unchanged, so checkpoints load either way.
    """
    fused = 0
    for method in [m for m in module.modules() if isinstance(m, EmbeddingMethod)]:
        for storage in method.storage():
            child = method.get_submodule(storage.path)
            if storage.options.method_owned or isinstance(child, FusedTables):
                continue
            tables = list(storage.configs)
            target = device or next(child.parameters()).device
            chosen = method.sparse_optimizer_for(storage, optimizer)
            check_fusable(tables, chosen, target, storage.pooled)
            replacement = FusedTables(tables, chosen, target, pooled=storage.pooled, options=storage.options)
            replacement.load_state_dict(child.state_dict())
            setattr(method, storage.path, replacement)
            fused += 1
            log.info("Fused %s.%s (%d tables) with sparse optimizer %s", method.name, storage.path, len(tables), chosen)
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

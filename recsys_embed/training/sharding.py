"""Sharded embedding tables on TorchRec: plan, wrap in ``DistributedModelParallel``, move weights in and out.

Sharding acts on the methods' storage declarations (:meth:`~recsys_embed.methods.base.EmbeddingMethod.storage`),
not on module types: every declared pooled group (a plain TorchRec ``EmbeddingBagCollection``) and unpooled group
(a plain ``EmbeddingCollection``) is planned by TorchRec's planner and wrapped by ``DistributedModelParallel``
(DMP), each with its own fused optimizer (the run's, or the declaration's override), weights precision (fp32 or
fp16, from the table configs' ``data_type``) and stochastic rounding. The method's remap runs locally on each rank
before TorchRec's input distribution; everything else (MLPs, projections, small dense maps) is replicated and
trained data-parallel through DDP. Method-owned declarations are never sharded. A TorchRec collection that no
method declares is an error (it would otherwise stay unsharded and unfused, with dense gradients on every rank).

Sharding types (TorchRec 1.8, checked with 2 gloo processes, forward and fused update equal to one process):

- pooled tables: table-wise, column-wise, table-column-wise on CPU; plus row-wise and table-row-wise on CUDA;
- unpooled tables: table-wise, column-wise and row-wise, on CPU too (TorchRec's ``EmbeddingCollectionSharder``
  has no table-column-wise or table-row-wise);
- data-parallel is not offered for either: it would bypass the fused sparse optimizer (and fails for unpooled
  tables on CPU).

A requested list of types applies to each kind where it can (``["row_wise", "table_column_wise"]`` on CPU shards
unpooled tables row-wise and pooled ones table-column-wise); a kind with declared tables and no allowed type left
is a clear error.

Checkpoints are written consolidated: :func:`consolidated_state_dict` gathers each sharded table to rank 0 as one
plain tensor, so a checkpoint has the same keys and shapes as an unsharded model's and loads on any number of
processes and any plan (:func:`load_sharded_state` copies each rank's slices back in); the fused optimizer state
moves the same way, column shards' own row-wise accumulators included (see ``training/sharded_state.py``).
``column_shard_dim`` sets how wide column-wise shards are (TorchRec's default, 128 columns, leaves narrower tables
whole).

Example (inside a process group, e.g. under ``torchrun``)::

    net = DLRM(build_embedding("qr", tables, budget=Budget(ratio=10)), num_dense=13)
    net = shard_model(net, SparseOptimizer(lr=0.05), device=torch.device("cpu"))
    dense_opt = torch.optim.Adam(dense_parameters(net), lr=1e-3)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection, JaggedTensor, KeyedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import Awaitable, ShardingEnv, ShardingType

from recsys_embed.methods.base import EmbeddingMethod
from recsys_embed.methods.fused import FusedTables, check_fusable, fbgemm_fused_params
from recsys_embed.methods.storage import PRECISION_BYTES, SparseOptimizer, TableStorage
from recsys_embed.training.planning import ShardingPlanError, log_plan, plan_sharding  # noqa: F401 - also this API
from recsys_embed.training.sharded_state import (  # noqa: F401 - also this module's API
    consolidated_optimizer_state,
    consolidated_state_dict,
    load_sharded_optimizer_state,
    load_sharded_state,
)

log = logging.getLogger(__name__)
# TorchRec 1.8's sharded tables are ShardedTensors, which torch flags as deprecated on every access.
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)

# Data-parallel tables would get dense gradients and the dense optimizer instead of the fused sparse one, so they
# are not offered; row-wise sharding of pooled tables needs CUDA in TorchRec.
CPU_SHARDING_TYPES = (
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
)
CUDA_SHARDING_TYPES = (*CPU_SHARDING_TYPES, ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
# Unpooled tables (TorchRec's EmbeddingCollectionSharder): the same three on CPU and CUDA.
UNPOOLED_SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.ROW_WISE.value)
_COLLECTION_TYPES = (EmbeddingBagCollection, EmbeddingCollection)


def _kind(pooled: bool) -> str:
    return "pooled" if pooled else "unpooled"


def allowed_sharding_types(
    device_type: str, requested: Sequence[str] | None = None, *, pooled: bool | None = True
) -> list[str]:
    """The sharding types the planner may use on ``device_type`` for pooled (``pooled=True``) or unpooled tables
    (``False``), or for either (``None``); ``requested`` keeps those of them it names, and must name at least one."""
    by_kind = {
        True: list(CUDA_SHARDING_TYPES if device_type == "cuda" else CPU_SHARDING_TYPES),
        False: list(UNPOOLED_SHARDING_TYPES),
    }
    allowed = by_kind[pooled] if pooled is not None else [*dict.fromkeys(by_kind[True] + by_kind[False])]
    if requested is None:
        return allowed
    chosen = [t for t in requested if t in allowed]
    if not chosen:
        what = "" if pooled is None else f" for {_kind(pooled)} tables"
        raise ValueError(
            f"Sharding types {list(requested)} are not available on {device_type}{what}: choose from {allowed} "
            "(pooled row-wise needs CUDA; unpooled tables shard table-wise, column-wise or row-wise; data-parallel "
            "is not offered: it would bypass the fused sparse optimizer)."
        )
    return chosen


@dataclass(frozen=True)
class DeclaredCollection:
    """A declared TorchRec collection found below the module being sharded: where it is and how it trains."""

    path: str  # in the sharded module
    module: EmbeddingBagCollection | EmbeddingCollection
    storage: TableStorage
    optimizer: SparseOptimizer

    def fused_params(self) -> dict[str, object]:
        """TorchRec's ``fused_params`` for this collection's kernels: optimizer and stochastic rounding (the
        weights' precision comes from the table configs' ``data_type``)."""
        return {**fbgemm_fused_params(self.optimizer), "stochastic_rounding": self.storage.options.stochastic_rounding}

    def keys(self) -> list[str]:
        return [f for table in self.storage.configs for f in table.feature_names]


def declared_collections(
    module: nn.Module, optimizer: SparseOptimizer, device: torch.device
) -> list[DeclaredCollection]:
    """The collections that sharding acts on: every non-method-owned declaration of every method below ``module``.

    Checks each against fbgemm's limits (:func:`~recsys_embed.methods.fused.check_fusable`) and raises a
    ``ValueError`` for a declared child that is not a plain TorchRec collection of its kind (already fused, or a
    subclass, which TorchRec's sharders do not match) and for a TorchRec collection that no method declares.
    """
    paths = {id(m): name for name, m in module.named_modules()}
    found: list[DeclaredCollection] = []
    claimed: set[int] = set()  # declared collections, method-owned included (those are the method's business)
    for method in [m for m in module.modules() if isinstance(m, EmbeddingMethod)]:
        for storage in method.storage():
            child = method.get_submodule(storage.path)
            path = paths[id(child)]
            claimed.add(id(child))
            if storage.options.method_owned:
                log.info("%s (%s) is method-owned: not sharded, updated by the method itself", path, method.name)
                continue
            expected = EmbeddingBagCollection if storage.pooled else EmbeddingCollection
            if type(child) is not expected:
                hint = (
                    "it is already fused: shard the plain model (fuse_tables is for one process without sharding)"
                    if isinstance(child, FusedTables)
                    else f"TorchRec's sharders match the exact type; hold a plain {expected.__name__} (add_tables does)"
                )
                raise ValueError(
                    f"Declared {_kind(storage.pooled)} tables {path!r} of method {method.name!r} are a "
                    f"{type(child).__name__}, not a {expected.__name__}: {hint}."
                )
            chosen = method.sparse_optimizer_for(storage, optimizer)
            check_fusable(list(storage.configs), chosen, device, storage.pooled)
            found.append(DeclaredCollection(path=path, module=child, storage=storage, optimizer=chosen))
    undeclared = [
        f"{name!r} ({type(m).__name__})"
        for name, m in module.named_modules()
        if isinstance(m, _COLLECTION_TYPES) and id(m) not in claimed
    ]
    if undeclared:
        raise ValueError(
            f"TorchRec collection(s) {', '.join(undeclared)} are not declared by any embedding method, so sharding "
            "would leave them unsharded and unfused (dense gradients, a full copy on every rank). Fix: hold the "
            "tables in a method (build_embedding('full', tables) for plain tables) or declare them with "
            "EmbeddingMethod.add_tables(...)."
        )
    return found


class _DeclaredSharderMixin:
    """Shards only the declared collections (others get no shardable parameters, so the planner skips them), each
    with its own ``fused_params``, limited to the allowed sharding types."""

    _fused_params: dict[str, Any] | None

    def __init__(
        self,
        optimizer: SparseOptimizer,
        sharding_types: Sequence[str],
        declared: Sequence[DeclaredCollection] = (),
    ) -> None:
        super().__init__(fused_params=fbgemm_fused_params(optimizer))  # type: ignore[call-arg]
        self._types = list(sharding_types)
        self._declared = {id(d.module): d.fused_params() for d in declared}

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(self._types)

    def shardable_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        if id(module) not in self._declared:  # not declared, or method-owned: never sharded
            return {}
        return super().shardable_parameters(module)  # type: ignore[misc]

    def shard(
        self, module: nn.Module, params: Any, env: ShardingEnv, device: Any = None, module_fqn: Any = None
    ) -> Any:
        """TorchRec's sharding of ``module`` with its declaration's fused parameters."""
        default = self._fused_params
        self._fused_params = self._declared.get(id(module), default)
        try:
            return super().shard(module, params, env, device, module_fqn)  # type: ignore[misc]
        finally:
            self._fused_params = default


class TableSharder(_DeclaredSharderMixin, EmbeddingBagCollectionSharder):
    """TorchRec's ``EmbeddingBagCollection`` sharder for declared pooled tables (per-declaration fused params)."""


class SequenceTableSharder(_DeclaredSharderMixin, EmbeddingCollectionSharder):
    """TorchRec's ``EmbeddingCollection`` sharder for declared unpooled tables (per-declaration fused params)."""


def shard_model(
    module: nn.Module,
    optimizer: SparseOptimizer,
    *,
    device: torch.device,
    sharding_types: Sequence[str] | None = None,
    memory_cap_bytes: int | None = None,
    column_shard_dim: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> DistributedModelParallel:
    """Shard the declared tables of every method below ``module`` over the process group, keeping their weights.

    Pooled and unpooled declarations alike; each trains with its own fused optimizer (its override, else
    ``optimizer``), precision and stochastic rounding; method-owned ones are left to the method. The rest of
    ``module`` is wrapped in DDP. Needs an initialised process group (``torch.distributed.init_process_group``;
    Lightning and torchrun set one up). A TorchRec collection that no method declares is a ``ValueError``.
    """
    declared = declared_collections(module, optimizer, device)
    types = {
        pooled: allowed_sharding_types(device.type, sharding_types, pooled=pooled)
        for pooled in sorted({d.storage.pooled for d in declared})
    }
    if not dist.is_initialized():
        raise RuntimeError(
            "shard_model needs torch.distributed: call torch.distributed.init_process_group first (torchrun or the "
            "Lightning 'torchrec' strategy do it)."
        )
    group = group or dist.group.WORLD
    weights = module.state_dict()  # the unsharded weights, copied into the shards below
    sharder_class = {True: TableSharder, False: SequenceTableSharder}
    sharders = [
        sharder_class[pooled](optimizer, kinds, [d for d in declared if d.storage.pooled == pooled])
        for pooled, kinds in types.items()
    ]
    plan = plan_sharding(
        module,
        sharders,
        device=device,
        memory_cap_bytes=memory_cap_bytes,
        column_shard_dim=column_shard_dim,
        group=group,
    )
    world = dist.get_world_size(group)
    sharded = DistributedModelParallel(
        module, env=ShardingEnv.from_process_group(group), device=device, plan=plan, sharders=sharders
    )
    load_sharded_state(sharded, weights)
    for collection in declared:
        hook = _in_feature_order if collection.storage.pooled else _in_key_order
        sharded.module.get_submodule(collection.path).register_forward_hook(partial(hook, keys=collection.keys()))
    if dist.get_rank(group) == 0:
        value_bytes = {
            f"{d.path}.{t.name}": PRECISION_BYTES[d.storage.options.precision]
            for d in declared
            for t in d.storage.configs
        }
        log_plan(plan, world, value_bytes)
        for d in declared:
            log.info(
                "Sharded %s (%s, %d tables, %s, stochastic rounding %s): sparse optimizer %s",
                d.path,
                _kind(d.storage.pooled),
                len(d.storage.configs),
                d.storage.options.precision,
                d.storage.options.stochastic_rounding,
                d.optimizer,
            )
        log.info("Sharded %d collection(s) over %d rank(s)", len(declared), world)
    return sharded


def _in_feature_order(module: nn.Module, inputs: object, pooled: KeyedTensor, *, keys: list[str]) -> KeyedTensor:
    """A sharded collection returns its features grouped by rank; give them back in the unsharded order, which the
    methods' combine steps (reshape, product, concatenation) rely on."""
    if pooled.keys() == keys:
        return pooled
    by_key = pooled.to_dict()
    values = torch.cat([by_key[k] for k in keys], dim=1)
    return KeyedTensor(keys=keys, length_per_key=[by_key[k].shape[1] for k in keys], values=values)


def _in_key_order(
    module: nn.Module, inputs: object, result: dict[str, JaggedTensor] | Awaitable[Any], *, keys: list[str]
) -> dict[str, JaggedTensor]:
    """A sharded ``EmbeddingCollection`` returns an awaitable dict with its keys grouped by rank; give back the
    plain dict in the unsharded key order (as the unsharded collection returns it)."""
    rows = result.wait() if isinstance(result, Awaitable) else result
    return {k: rows[k] for k in keys}

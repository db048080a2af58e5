"""Sharded embedding tables on TorchRec: plan, wrap in ``DistributedModelParallel``, move weights in and out.

Every compression method holds plain TorchRec ``EmbeddingBagCollection``s as children, so TorchRec's planner and
``DistributedModelParallel`` (DMP) shard their physical tables exactly like full tables: the method's remap runs
locally on each rank before TorchRec's input distribution, the tables become fbgemm kernels with the sparse
optimizer fused in backward, and everything else (MLPs, projections, small dense maps) is replicated and trained
data-parallel through DDP.

Checkpoints are written consolidated: :func:`consolidated_state_dict` gathers each sharded table to rank 0 as one
plain tensor, so a checkpoint has the same keys and shapes as an unsharded model's and loads on any number of
processes (:func:`load_sharded_state` copies each rank's slices back in).

Example (inside a process group, e.g. under ``torchrun``)::

    net = DLRM(build_embedding("qr", tables, budget=Budget(ratio=10)), num_dense=13)
    net = shard_model(net, SparseOptimizer(lr=0.05), device=torch.device("cpu"))
    dense_opt = torch.optim.Adam(dense_parameters(net), lr=1e-3)
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection, KeyedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType

from recsys_embed.methods.base import FP32_BYTES
from recsys_embed.methods.fused import check_fusable, fbgemm_fused_params
from recsys_embed.methods.storage import SparseOptimizer

log = logging.getLogger(__name__)
# TorchRec 1.8's sharded tables are ShardedTensors, which torch flags as deprecated on every access.
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)

# Data-parallel tables would get dense gradients and the dense optimizer instead of the fused sparse one, so they
# are not offered; row-wise sharding needs CUDA in TorchRec.
CPU_SHARDING_TYPES = (
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
)
CUDA_SHARDING_TYPES = (*CPU_SHARDING_TYPES, ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class ShardingPlanError(RuntimeError):
    """TorchRec's planner found no plan (raised on every rank, with each failing rank's message)."""


def allowed_sharding_types(device_type: str, requested: Sequence[str] | None = None) -> list[str]:
    """The sharding types the planner may use on ``device_type``; ``requested`` must be a subset of them."""
    allowed = list(CUDA_SHARDING_TYPES if device_type == "cuda" else CPU_SHARDING_TYPES)
    if requested is None:
        return allowed
    unknown = [t for t in requested if t not in allowed]
    if unknown or not requested:
        raise ValueError(
            f"Sharding types {list(requested)} are not available on {device_type}: choose from {allowed} "
            "(row-wise needs CUDA; data-parallel is not offered: it would bypass the fused sparse optimizer)."
        )
    return list(requested)


class TableSharder(EmbeddingBagCollectionSharder):
    """TorchRec's ``EmbeddingBagCollection`` sharder, with the fused optimizer set and the sharding types limited."""

    def __init__(self, optimizer: SparseOptimizer, sharding_types: Sequence[str] | None = None) -> None:
        super().__init__(fused_params=fbgemm_fused_params(optimizer))
        self._requested = None if sharding_types is None else list(sharding_types)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return allowed_sharding_types(compute_device_type, self._requested)


def plan_sharding(
    module: nn.Module,
    sharders: list[TableSharder],
    *,
    device: torch.device,
    memory_cap_bytes: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Plan with TorchRec's ``EmbeddingShardingPlanner`` on every rank (same inputs, same plan).

    ``memory_cap_bytes`` caps each rank's table storage (host memory on CPU, HBM on CUDA). Planning runs locally
    on each rank and the outcomes are exchanged, so a plan that does not fit raises :class:`ShardingPlanError` with
    the planner's message on every rank instead of leaving the others waiting in a collective.
    """
    world = dist.get_world_size(group)
    caps = {}
    if memory_cap_bytes is not None:
        caps = {"hbm_cap_bytes" if device.type == "cuda" else "ddr_cap_bytes": memory_cap_bytes}
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world, local_world_size=local_world_size(world), **caps),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    plan, error = None, None
    try:
        plan = EmbeddingShardingPlanner(topology=topology).plan(module, sharders)
    except Exception as exc:  # the planner raises several types; all are reported the same way
        error = re.sub(r" at 0x[0-9a-f]+", "", f"{type(exc).__name__}: {exc}")  # same text on every rank
    errors: list[str | None] = [None] * world
    dist.all_gather_object(errors, error, group=group)
    failed = {rank: message for rank, message in enumerate(errors) if message}
    if failed:
        messages = set(failed.values())
        where = f"on all {world} ranks" if len(failed) == world else f"on ranks {sorted(failed)}"
        detail = messages.pop() if len(messages) == 1 else " | ".join(f"rank {r}: {m}" for r, m in failed.items())
        cap = f"{memory_cap_bytes} bytes per rank" if memory_cap_bytes is not None else "the planner's default"
        raise ShardingPlanError(
            f"TorchRec's sharding planner found no plan for the embedding tables {where} (memory cap: {cap}).\n"
            f"{detail.strip()}\nFix: raise the per-rank memory cap (strategy memory_cap_bytes), use more devices, or "
            "compress more (a smaller model.embedding.budget)."
        )
    assert plan is not None
    return plan


def local_world_size(world: int) -> int:
    """Processes per node: ``LOCAL_WORLD_SIZE`` (set by torchrun and Lightning), else the whole world."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def describe_plan(plan: ShardingPlan) -> tuple[list[str], dict[int, int]]:
    """One line per table (how it is sharded, on which ranks, shard shapes) and fp32 table bytes per rank."""
    lines, per_rank = [], defaultdict(int)
    for module_path, module_plan in plan.plan.items():
        for table, sharding in module_plan.items():  # type: ignore[union-attr]
            shards = sharding.sharding_spec.shards if sharding.sharding_spec is not None else []
            placed = []
            for shard in shards:
                rank = shard.placement.rank()
                per_rank[rank] += math.prod(shard.shard_sizes) * FP32_BYTES
                placed.append(f"rank {rank} {'x'.join(map(str, shard.shard_sizes))}")
            lines.append(f"{module_path}.{table}: {sharding.sharding_type} -> {', '.join(placed)}")
    return lines, dict(per_rank)


def log_plan(plan: ShardingPlan, world: int) -> None:
    lines, per_rank = describe_plan(plan)
    log.info("Sharding plan (%d tables on %d ranks):\n  %s", len(lines), world, "\n  ".join(lines))
    log.info(
        "Embedding table memory per rank (fp32 rows, optimizer state not counted): %s",
        ", ".join(f"rank {r}: {per_rank.get(r, 0) / 2**20:.3g} MiB" for r in range(world)),
    )


def shard_model(
    module: nn.Module,
    optimizer: SparseOptimizer,
    *,
    device: torch.device,
    sharding_types: Sequence[str] | None = None,
    memory_cap_bytes: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> DistributedModelParallel:
    """Shard every ``EmbeddingBagCollection`` below ``module`` over the process group, keeping its current weights.

    The tables train with ``optimizer`` fused in backward; the rest of ``module`` is wrapped in DDP. Needs an
    initialised process group (``torch.distributed.init_process_group``; Lightning and torchrun set one up).
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "shard_model needs torch.distributed: call torch.distributed.init_process_group first (torchrun or the "
            "Lightning 'torchrec' strategy do it)."
        )
    group = group or dist.group.WORLD
    collections = {name: m for name, m in module.named_modules() if type(m) is EmbeddingBagCollection}
    for collection in collections.values():
        check_fusable(collection.embedding_bag_configs(), optimizer, device)
    weights = module.state_dict()  # the unsharded weights, copied into the shards below
    sharders = [TableSharder(optimizer, sharding_types)]
    plan = plan_sharding(module, sharders, device=device, memory_cap_bytes=memory_cap_bytes, group=group)
    world = dist.get_world_size(group)
    sharded = DistributedModelParallel(
        module, env=ShardingEnv.from_process_group(group), device=device, plan=plan, sharders=sharders
    )
    load_sharded_state(sharded, weights)
    for name, collection in collections.items():
        keys = [f for table in collection.embedding_bag_configs() for f in table.feature_names]
        sharded.module.get_submodule(name).register_forward_hook(partial(_in_feature_order, keys=keys))
    if dist.get_rank(group) == 0:
        log_plan(plan, world)
        log.info("Sharded %d collection(s) over %d rank(s), sparse optimizer %s", len(collections), world, optimizer)
    return sharded


def _in_feature_order(module: nn.Module, inputs: object, pooled: KeyedTensor, *, keys: list[str]) -> KeyedTensor:
    """A sharded collection returns its features grouped by rank; give them back in the unsharded order, which the
    methods' combine steps (reshape, product, concatenation) rely on."""
    if pooled.keys() == keys:
        return pooled
    by_key = pooled.to_dict()
    values = torch.cat([by_key[k] for k in keys], dim=1)
    return KeyedTensor(keys=keys, length_per_key=[by_key[k].shape[1] for k in keys], values=values)


def load_sharded_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a plain (unsharded) state dict into ``module``, whose sharded tables take only their own slices."""
    targets = module.state_dict()
    missing = sorted(set(targets) - set(state))
    if missing:
        raise ValueError(
            f"The state dict lacks {len(missing)} entries of the sharded model (first: {missing[:3]}): it was saved "
            "from another model or method configuration."
        )
    with torch.no_grad():
        for key, target in targets.items():
            source = state[key]
            if isinstance(target, ShardedTensor):
                if tuple(source.shape) != tuple(target.size()):
                    raise ValueError(f"{key}: saved shape {tuple(source.shape)}, sharded table {tuple(target.size())}.")
                for shard in target.local_shards():
                    shard.tensor.copy_(source[_shard_index(shard.metadata.shard_offsets, shard.metadata.shard_sizes)])
            else:
                target.copy_(source)


def consolidated_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with each sharded table gathered into one plain CPU tensor on rank 0.

    A collective: every rank must call it. Rank 0 gets the whole state (same keys and shapes as the unsharded
    model); other ranks get the unsharded entries only. Tables are gathered one at a time, so rank 0 needs host
    memory for the whole model but its device only for one table.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            device = value.local_shards()[0].tensor.device if value.local_shards() else torch.device("cpu")
            full = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == 0 else None
            value.gather(dst=0, out=full)
            if full is not None:
                out[key] = full.cpu()
        else:
            out[key] = value
    return out


def _shard_index(offsets: Sequence[int], sizes: Sequence[int]) -> tuple[slice, ...]:
    """Where a shard sits in its whole tensor."""
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))


def _optimizer_states(module: DistributedModelParallel) -> list[tuple[str, str, ShardedTensor]]:
    """``(collection path, key, sharded state)`` of this rank's fused tables; ``key`` is ``f"{table}.{i}"``, the
    ``i``-th state of the table by name, as in :meth:`FusedTables.optimizer_state`."""
    states = []
    for param_key, named in module.fused_optimizer.state_dict()["state"].items():
        path, table = param_key.rsplit(".embedding_bags.", 1)
        table = table.removesuffix(".weight")
        states.extend((path, f"{table}.{i}", named[name]) for i, name in enumerate(sorted(named)))
    return states


def consolidated_optimizer_state(
    module: DistributedModelParallel, prefix: str = ""
) -> dict[str, dict[str, torch.Tensor]]:
    """The fused optimizer state (e.g. row-wise Adagrad accumulators) of every sharded table, gathered on rank 0.

    A collective. The layout equals :meth:`FusedTables.optimizer_state` per collection,
    ``{prefix + path: {f"{table}.{i}": tensor}}``, so the state moves between sharded and unsharded runs. Shards
    of a row-wise state that repeat the same rows (column-wise sharding) are averaged (equal-width shards make that
    the whole row's mean).
    """
    local = [
        (path, key, tuple(state.size()), [(s.metadata.shard_offsets, s.tensor.cpu()) for s in state.local_shards()])
        for path, key, state in _optimizer_states(module)
    ]
    gathered: list[object] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if gathered is None:
        return {}
    totals: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for path, key, size, shards in (entry for rank_states in gathered for entry in rank_states):  # type: ignore[union-attr]
        total, count = totals.setdefault((path, key), (torch.zeros(size), torch.zeros(size)))
        for offsets, tensor in shards:
            total[_shard_index(offsets, tensor.shape)] += tensor
            count[_shard_index(offsets, tensor.shape)] += 1
    out: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for (path, key), (total, count) in sorted(totals.items()):
        out[prefix + path][key] = total / count.clamp(min=1)
    return dict(out)


def load_sharded_optimizer_state(
    module: DistributedModelParallel, saved: Mapping[str, Mapping[str, torch.Tensor]], prefix: str = ""
) -> None:
    """Copy what :func:`consolidated_optimizer_state` (or unsharded ``FusedTables``) saved into this rank's shards."""
    with torch.no_grad():
        for path, key, state in _optimizer_states(module):
            source = saved.get(prefix + path, {}).get(key)
            if source is None or tuple(source.shape) != tuple(state.size()):
                raise ValueError(
                    f"The checkpoint has no fused optimizer state {prefix + path}/{key} of shape "
                    f"{tuple(state.size())}: it was written with other tables or another sparse optimizer."
                )
            for shard in state.local_shards():
                shard.tensor.copy_(source[_shard_index(shard.metadata.shard_offsets, shard.metadata.shard_sizes)])

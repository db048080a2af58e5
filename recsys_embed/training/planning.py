"""Planning sharded tables with TorchRec's planner: the same plan on every rank, failures reported on all of them.

:func:`plan_sharding` runs ``EmbeddingShardingPlanner`` on each rank (same inputs, same plan) and exchanges the
outcomes, so a plan that does not fit raises :class:`ShardingPlanError` everywhere instead of leaving ranks waiting
in a collective; :func:`log_plan` logs where each table went and the table memory per rank.

Example (inside a process group; :func:`~recsys_embed.training.sharding.shard_model` builds the sharders)::

    plan = plan_sharding(module, sharders, device=torch.device("cpu"), memory_cap_bytes=2**30, column_shard_dim=4)
    log_plan(plan, world=torch.distributed.get_world_size())
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan

from recsys_embed.methods.base import TBE_DIM_MULTIPLE
from recsys_embed.methods.storage import PRECISION_BYTES

log = logging.getLogger(__name__)


class ShardingPlanError(RuntimeError):
    """TorchRec's planner found no plan (raised on every rank, with each failing rank's message)."""


def plan_sharding(
    module: nn.Module,
    sharders: Sequence[EmbeddingBagCollectionSharder | EmbeddingCollectionSharder],
    *,
    device: torch.device,
    memory_cap_bytes: int | None = None,
    column_shard_dim: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Plan with TorchRec's ``EmbeddingShardingPlanner`` on every rank (same inputs, same plan).

    ``memory_cap_bytes`` caps each rank's table storage (host memory on CPU, HBM on CUDA). Planning runs locally
    on each rank and the outcomes are exchanged, so a plan that does not fit raises :class:`ShardingPlanError` with
    the planner's message on every rank instead of leaving the others waiting in a collective.
    ``column_shard_dim`` sets the width of column-wise shards (TorchRec's ``min_partition``; default: 128, so
    narrower tables stay whole under column-wise sharding; a table whose dim it does not divide stays whole).
    """
    world = dist.get_world_size(group)
    caps = {}
    if memory_cap_bytes is not None:
        caps = {"hbm_cap_bytes" if device.type == "cuda" else "ddr_cap_bytes": memory_cap_bytes}
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world, local_world_size=local_world_size(world), **caps),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    constraints = _column_constraints(module, column_shard_dim)  # a bad width fails alike on every rank
    plan, error = None, None
    try:
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.plan(module, list(sharders))  # type: ignore[arg-type]
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


def _column_constraints(module: nn.Module, column_shard_dim: int | None) -> dict[str, ParameterConstraints] | None:
    """The planner's per-table constraints that make column-wise shards ``column_shard_dim`` wide."""
    if column_shard_dim is None:
        return None
    if column_shard_dim <= 0 or column_shard_dim % TBE_DIM_MULTIPLE:
        raise ValueError(
            f"column_shard_dim must be a positive multiple of {TBE_DIM_MULTIPLE} (fbgemm's kernels need it); got "
            f"{column_shard_dim}."
        )
    names = {
        t.name
        for m in module.modules()
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
        for t in (m.embedding_bag_configs() if isinstance(m, EmbeddingBagCollection) else m.embedding_configs())
    }
    return {name: ParameterConstraints(min_partition=column_shard_dim) for name in sorted(names)}


def local_world_size(world: int) -> int:
    """Processes per node: ``LOCAL_WORLD_SIZE`` (set by torchrun and Lightning), else the whole world."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def describe_plan(plan: ShardingPlan, value_bytes: Mapping[str, int] | None = None) -> tuple[list[str], dict[int, int]]:
    """One line per table (how it is sharded, on which ranks, shard shapes) and table bytes per rank;
    ``value_bytes`` gives bytes per weight by ``f"{module_path}.{table}"`` (default: fp32)."""
    lines, per_rank = [], defaultdict(int)
    for module_path, module_plan in plan.plan.items():
        for table, sharding in module_plan.items():  # type: ignore[union-attr]
            per_value = (value_bytes or {}).get(f"{module_path}.{table}", PRECISION_BYTES["fp32"])
            shards = sharding.sharding_spec.shards if sharding.sharding_spec is not None else []
            placed = []
            for shard in shards:
                rank = shard.placement.rank()
                per_rank[rank] += math.prod(shard.shard_sizes) * per_value
                placed.append(f"rank {rank} {'x'.join(map(str, shard.shard_sizes))}")
            lines.append(f"{module_path}.{table}: {sharding.sharding_type} -> {', '.join(placed)}")
    return lines, dict(per_rank)


def log_plan(plan: ShardingPlan, world: int, value_bytes: Mapping[str, int] | None = None) -> None:
    lines, per_rank = describe_plan(plan, value_bytes)
    log.info("Sharding plan (%d tables on %d ranks):\n  %s", len(lines), world, "\n  ".join(lines))
    log.info(
        "Embedding table memory per rank (weights at their precision, optimizer state not counted): %s",
        ", ".join(f"rank {r}: {per_rank.get(r, 0) / 2**20:.3g} MiB" for r in range(world)),
    )

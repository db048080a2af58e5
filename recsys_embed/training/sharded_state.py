"""Moving sharded tables' state in and out: weights and fused optimizer state, consolidated on rank 0.

:func:`consolidated_state_dict` gathers each sharded table to rank 0 as one plain tensor, so a checkpoint has the
same keys and shapes as an unsharded model's and loads on any number of processes (:func:`load_sharded_state`
copies each rank's slices back in); :func:`consolidated_optimizer_state` and :func:`load_sharded_optimizer_state`
do the same for the fused optimizer's per-table state.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel


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


#: a sharded table's parameter key: ``{collection path}.embedding_bags.{table}.weight`` (pooled) or
#: ``{collection path}.embeddings.{table}.weight`` (unpooled)
_TABLE_WEIGHT = re.compile(r"(?P<path>.+)\.(?:embedding_bags|embeddings)\.(?P<table>[^.]+)\.weight")


def _optimizer_states(module: DistributedModelParallel) -> list[tuple[str, str, ShardedTensor]]:
    """``(collection path, key, sharded state)`` of this rank's fused tables; ``key`` is ``f"{table}.{i}"``, the
    ``i``-th state of the table by name, as in :meth:`FusedTables.optimizer_state`."""
    states = []
    for param_key, named in module.fused_optimizer.state_dict()["state"].items():
        found = _TABLE_WEIGHT.fullmatch(param_key)
        if found is None:
            raise ValueError(f"Unexpected fused parameter {param_key!r}: not a TorchRec collection's table weight.")
        path, table = found.group("path"), found.group("table")
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

"""Moving sharded tables' state in and out: weights and fused optimizer state, consolidated on rank 0.

:func:`consolidated_state_dict` gathers each sharded table to rank 0 as one plain tensor, so a checkpoint has the
same keys and shapes as an unsharded model's and loads on any number of processes (:func:`load_sharded_state`
copies each rank's slices back in, for any sharding plan).

The fused optimizer's state needs more care. An element-wise state (Adagrad's ``[rows, dim]``) is sharded like its
table. A row-wise state (row-wise Adagrad's ``[rows]``) is not: under column-wise and table-column-wise sharding
every column shard keeps its own accumulator for all rows (the mean of the squared gradients over *its* columns),
and TorchRec lays these side by side as one ``[rows * column shards]`` tensor whose layout depends on the plan.
:func:`gather_optimizer_state` therefore returns two parts:

- the unsharded layout of :meth:`FusedTables.optimizer_state` (``{path: {f"{table}.{i}": tensor}}``, row-wise
  states ``[rows]``): the column shards' accumulators averaged, weighted by their widths (the whole row's mean
  squared gradient, which is what one process accumulates); one process loads it as it is;
- ``column_shards``: for each row-wise state of a column-split table, every column range's own accumulator
  (``{"column_offsets": [k + 1], "values": [k, rows]}``), so that reloading onto shards restores each one exactly.

:func:`load_sharded_optimizer_state` gives each local shard of any plan the width-weighted mean (in float64) of the
saved accumulators over its columns: exact for the same column split and for one process, the mean otherwise.

Example::

    weights = consolidated_state_dict(net)  # every rank calls these; rank 0 gets the whole state
    state, column_shards = gather_optimizer_state(net)
    load_sharded_state(other, weights)  # other: sharded on any number of ranks, any plan
    load_sharded_optimizer_state(other, state, column_shards=column_shards)
    load_fused_optimizer_state(one_process_net, state)  # FusedTables on one process
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel

from recsys_embed.methods.fused import FusedTables

#: ``{path: {f"{table}.{i}": tensor}}``, the layout of :meth:`FusedTables.optimizer_state` per collection
OptimizerState = dict[str, dict[str, torch.Tensor]]
#: ``{path: {f"{table}.{i}": {"column_offsets": LongTensor[k + 1], "values": Tensor[k, rows]}}}``
ColumnShards = dict[str, dict[str, dict[str, torch.Tensor]]]
#: where a shard sits in its table: ``(row start, row stop, column start, column stop)``
Place = tuple[int, int, int, int]


def load_sharded_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a plain (unsharded) state dict into ``module``, whose sharded tables take only their own slices."""
    targets = module.state_dict()
    missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"The state dict does not match the sharded model: {len(missing)} missing entries (first: "
            f"{missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]}). It was saved from another "
            "model or method configuration: load it into the model that wrote it."
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
                copy_same_shape(key, target, source)


def copy_same_shape(key: str, target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, refusing a shape mismatch that ``copy_`` would broadcast or fail on."""
    if tuple(source.shape) != tuple(target.shape):
        raise ValueError(
            f"{key}: saved shape {tuple(source.shape)}, the model's {tuple(target.shape)}. The checkpoint was written "
            "by another model configuration: load it into the model that wrote it."
        )
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


def _local_places(weight: ShardedTensor, state: ShardedTensor) -> list[tuple[Place, torch.Tensor]]:
    """This rank's shards of ``state`` and where each sits in the table ``weight``.

    Element-wise states are sharded like the table. Row-wise ones are ``[rows]`` under table-wise and row-wise
    sharding, and ``[rows * k]`` under a split into ``k`` column shards (TorchRec puts the accumulator of the
    ``j``-th column shard, by column offset, at ``j * rows``).
    """
    local = [(s.metadata, s.tensor) for s in state.local_shards()]
    if state.dim() == 2:
        return [(_place(m.shard_offsets, m.shard_sizes), t) for m, t in local]
    rows, dim = weight.size()
    shards = weight.metadata().shards_metadata
    split_columns = any(s.shard_sizes[1] != dim for s in shards)
    if split_columns and any(s.shard_sizes[0] != rows for s in shards):
        raise ValueError(
            f"Fused optimizer state of shape {tuple(state.size())} for a table split in rows and columns (grid "
            "sharding) is not supported in checkpoints; use table-wise, row-wise, column-wise or table-column-wise."
        )
    if split_columns:
        by_column = sorted(shards, key=lambda s: s.shard_offsets[1])
        places = {j * rows: _place(s.shard_offsets, s.shard_sizes) for j, s in enumerate(by_column)}
    else:
        places = {s.shard_offsets[0]: _place(s.shard_offsets, s.shard_sizes) for s in shards}
    return [(places[m.shard_offsets[0]], t) for m, t in local]


def _place(offsets: Sequence[int], sizes: Sequence[int]) -> Place:
    return offsets[0], offsets[0] + sizes[0], offsets[1], offsets[1] + sizes[1]


def _optimizer_states(module: DistributedModelParallel) -> list[tuple[str, str, ShardedTensor, ShardedTensor]]:
    """``(collection path, key, sharded state, sharded table)`` of this rank's fused tables; ``key`` is
    ``f"{table}.{i}"``, the ``i``-th state of the table by name, as in :meth:`FusedTables.optimizer_state`."""
    weights = module.state_dict()
    states = []
    for param_key, named in module.fused_optimizer.state_dict()["state"].items():
        found = _TABLE_WEIGHT.fullmatch(param_key)
        if found is None:
            raise ValueError(f"Unexpected fused parameter {param_key!r}: not a TorchRec collection's table weight.")
        path, table = found.group("path"), found.group("table")
        weight = weights[param_key]
        states.extend((path, f"{table}.{i}", named[name], weight) for i, name in enumerate(sorted(named)))
    return states


def gather_optimizer_state(module: DistributedModelParallel, prefix: str = "") -> tuple[OptimizerState, ColumnShards]:
    """The fused optimizer state of every sharded table, gathered on rank 0 (a collective; other ranks get
    empty dicts): the unsharded layout and the column shards' own row-wise accumulators (see the module doc)."""
    local = [
        (path, key, tuple(weight.size()), state.dim() == 1, [(p, t.cpu()) for p, t in _local_places(weight, state)])
        for path, key, state, weight in _optimizer_states(module)
    ]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if gathered is None:
        return {}, {}
    pieces: dict[tuple[str, str], list[tuple[Place, torch.Tensor]]] = defaultdict(list)
    shapes: dict[tuple[str, str], tuple[tuple[int, int], bool]] = {}
    for path, key, size, rowwise, shards in (entry for rank_states in gathered for entry in rank_states):
        shapes[(path, key)] = (size, rowwise)
        pieces[(path, key)].extend(shards)
    states: OptimizerState = defaultdict(dict)
    columns: ColumnShards = defaultdict(dict)
    for (path, key), (size, rowwise) in sorted(shapes.items()):
        placed = pieces[(path, key)]
        if not rowwise:
            full = torch.empty(size, dtype=placed[0][1].dtype)
            for (r0, r1, c0, c1), tensor in placed:
                full[r0:r1, c0:c1] = tensor
            states[prefix + path][key] = full
            continue
        ranges = sorted({(c0, c1) for (_, _, c0, c1), _ in placed})
        values = torch.empty(len(ranges), size[0], dtype=placed[0][1].dtype)
        for (r0, r1, c0, c1), tensor in placed:
            values[ranges.index((c0, c1)), r0:r1] = tensor
        offsets = torch.tensor([c0 for c0, _ in ranges] + [size[1]])
        states[prefix + path][key] = _column_mean(offsets, values, 0, size[1])
        if len(ranges) > 1:
            columns[prefix + path][key] = {"column_offsets": offsets, "values": values}
    return dict(states), dict(columns)


def consolidated_optimizer_state(module: DistributedModelParallel, prefix: str = "") -> OptimizerState:
    """The unsharded layout of :func:`gather_optimizer_state` (what one process's ``FusedTables`` loads)."""
    return gather_optimizer_state(module, prefix)[0]


def _column_mean(offsets: torch.Tensor, values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The row-wise accumulator of columns ``start:stop``: the saved column ranges' ``values`` (``[k, rows]``,
    range ``j`` covering ``offsets[j]:offsets[j + 1]``) averaged by their overlap, in float64 (exact for one range)."""
    overlap = (offsets[1:].clamp(max=stop) - offsets[:-1].clamp(min=start)).clamp(min=0).double()
    if overlap.sum() != stop - start:
        raise ValueError(f"Saved column shards {offsets.tolist()} do not cover columns {start}:{stop}.")
    return ((overlap[:, None] * values.double()).sum(0) / (stop - start)).to(values.dtype)


def load_sharded_optimizer_state(
    module: DistributedModelParallel,
    saved: Mapping[str, Mapping[str, torch.Tensor]],
    prefix: str = "",
    column_shards: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
) -> None:
    """Copy what :func:`gather_optimizer_state` (or unsharded ``FusedTables``) saved into this rank's shards, for
    any sharding plan: each column shard's row-wise accumulator from ``column_shards`` when saved (exact for the
    same split), else from the unsharded layout."""
    targets = _optimizer_states(module)
    model = {
        f"{prefix + path}/{key}": (weight.size(0),) if state.dim() == 1 else tuple(weight.size())
        for path, key, state, weight in targets
    }
    saved_shapes = {f"{path}/{key}": tuple(v.shape) for path, states in saved.items() for key, v in states.items()}
    check_saved_shapes("the fused optimizer state", saved_shapes, model)  # on every rank alike
    with torch.no_grad():
        for path, key, state, weight in targets:
            source = saved[prefix + path][key]
            rows, dim = weight.size()
            split = (column_shards or {}).get(prefix + path, {}).get(key)
            offsets, values = (torch.tensor([0, dim]), source[None])  # one range: the whole row
            if split is not None:
                offsets, values = split["column_offsets"], split["values"]
            for (r0, r1, c0, c1), tensor in _local_places(weight, state):
                if state.dim() == 2:
                    tensor.copy_(source[r0:r1, c0:c1])
                else:
                    tensor.copy_(_column_mean(offsets, values[:, r0:r1], c0, c1))


def load_fused_optimizer_state(module: nn.Module, saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Restore the unsharded layout into the :class:`FusedTables` below ``module`` (one process), checking that the
    saved collections, entries and shapes are this model's."""
    fused = {name: m for name, m in module.named_modules() if isinstance(m, FusedTables)}
    current = {name: m.optimizer_state() for name, m in fused.items()}
    model = {f"{name}/{key}": tuple(v.shape) for name, states in current.items() for key, v in states.items()}
    saved_shapes = {f"{path}/{key}": tuple(v.shape) for path, states in saved.items() for key, v in states.items()}
    check_saved_shapes("the fused optimizer state", saved_shapes, model, gather=False)
    for name in current:
        fused[name].load_optimizer_state(dict(saved[name]))


def check_saved_shapes(
    what: str, saved: Mapping[str, Sequence[int]], model: Mapping[str, Sequence[int]], gather: bool = True
) -> None:
    """Check that a saved state (``{key: shape}``) has exactly the model's entries and shapes, else raise one
    ``ValueError`` naming ``what``. A rank holds only some tables' states, so with ``gather`` (and a process group)
    the model's ``{key: shape}`` of every rank is gathered first: every rank checks the same and raises alike (a
    rank raising alone would leave the others waiting in the next collective).

    Example::

        check_saved_shapes("the sharded checkpoint x.shards", {"t0": (7, 8)}, {"t0": (7, 8)})  # passes
    """
    shapes = {key: tuple(shape) for key, shape in model.items()}
    if gather and dist.is_initialized():
        everyone: list[dict[str, tuple[int, ...]]] = [{}] * dist.get_world_size()
        dist.all_gather_object(everyone, shapes)
        shapes = {key: shape for rank_shapes in everyone for key, shape in rank_shapes.items()}
    missing, unexpected = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"{what[:1].upper() + what[1:]} does not match the model: {len(missing)} missing entries (first: "
            f"{missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]}). It was written by another "
            "model, method or sparse optimizer: load it into the model that wrote it."
        )
    wrong = sorted(key for key, shape in shapes.items() if tuple(saved[key]) != shape)
    if wrong:
        raise ValueError(
            f"{len(wrong)} entries of {what} have other shapes than the model's (first: {wrong[0]}, saved "
            f"{tuple(saved[wrong[0]])}, model {shapes[wrong[0]]}): it was written with other tables or another "
            "sparse optimizer. Load it into the model that wrote it."
        )

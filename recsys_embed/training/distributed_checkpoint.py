"""Sharded checkpoints written by every rank: ``torch.distributed.checkpoint`` (DCP) for TorchRec tables.

:func:`save_sharded_state` writes the sharded tables' weights and fused optimizer state with ``dcp.save`` into a
folder (``<ckpt>.shards-<token>/``, a new one each save: :func:`save_checkpoint_shards`): each rank writes only its
own shards (``__{rank}_0.distcp``, rank 0 also the ``.metadata``), so no rank gathers the whole model.
:func:`load_sharded_checkpoint` reads them into a model sharded on any number of ranks with any plan (DCP reshards by
offsets), and :func:`read_sharded_state` on one process with no process group, as the consolidated export of
:mod:`~recsys_embed.training.sharded_state`.

Every saved tensor has a plan-independent shape. Weights and element-wise optimizer states (Adagrad's
``[rows, dim]``) are TorchRec's own sharded tensors. A row-wise state (row-wise Adagrad's accumulator) is kept per
column shard, in a layout that depends on the plan (see ``sharded_state``); it is saved as ``[rows, dim / 4]``
*column blocks* (4 columns, the narrowest column shard fbgemm allows), sharded like the table: the block of rows
``r`` and columns ``4b:4b + 4`` holds the accumulator of the column shard that owns those columns. Each rank fills
only its own blocks, so saving needs no collective beyond DCP's own, and costs a quarter of the table's size per
row-wise state. A shard of another plan takes the mean of the blocks it covers (in float64): exact for the same
column split and for one process (the width-weighted mean the consolidated export holds), the mean otherwise.

Example::

    name = save_checkpoint_shards(net, "runs/x/last.ckpt")  # every rank; net: DistributedModelParallel
    load_sharded_checkpoint(other, f"runs/x/{name}")  # any world size, any CPU sharding type
    weights, optimizer, column_shards = read_sharded_state(f"runs/x/{name}")  # one process
"""

from __future__ import annotations

import argparse
import glob
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchrec.distributed.model_parallel import DistributedModelParallel

from recsys_embed.training.sharded_state import (
    ColumnShards,
    OptimizerState,
    _column_mean,
    _local_places,
    _optimizer_states,
    check_saved_shapes,
    copy_same_shape,
)

#: columns per saved block of a row-wise optimizer state
BLOCK = 4
#: DCP key prefixes of an element-wise and a row-wise (column-blocked) fused optimizer state
ELEMENT_WISE, ROW_WISE = "fused_optimizer", "fused_optimizer_blocks"
#: the checkpoint entry naming the shards folder (relative to the checkpoint file) of a sharded checkpoint
SHARDS_KEY = "sharded_tables"


def _block_offsets(dim: int) -> torch.Tensor:
    return torch.arange(0, dim + 1, BLOCK)


def check_block_widths(weight: ShardedTensor) -> None:
    """A sharded table's dim and column shards must be whole blocks (every rank sees every table: all raise)."""
    dim = weight.size()[1]
    widths = {dim, *(s.shard_sizes[1] for s in weight.metadata().shards_metadata)}
    if any(width % BLOCK for width in widths):
        raise ValueError(
            f"A table of dim {dim} with column shards {sorted(widths)} wide: sharded checkpoints need dims and column "
            f"shards in multiples of {BLOCK}; use checkpoint_format='consolidated' for this model."
        )


def check_sharded_layout(net: DistributedModelParallel) -> None:
    """Whether sharded checkpoints can hold ``net``: :func:`check_block_widths` for every sharded table (called at
    setup, so that a model they cannot hold fails before training, not at its first checkpoint)."""
    for weight in net.state_dict().values():
        if isinstance(weight, ShardedTensor):
            check_block_widths(weight)


def _row_wise_blocks(weight: ShardedTensor, state: ShardedTensor) -> ShardedTensor:
    """The row-wise ``state`` of table ``weight`` as ``[rows, dim / BLOCK]`` blocks sharded like the table."""
    rows, dim = weight.size()
    shards = [
        ShardMetadata(
            [s.shard_offsets[0], s.shard_offsets[1] // BLOCK],
            [s.shard_sizes[0], s.shard_sizes[1] // BLOCK],
            s.placement,
        )
        for s in weight.metadata().shards_metadata
    ]
    rank = dist.get_rank()
    local = []
    for (r0, r1, c0, c1), tensor in _local_places(weight, state):
        place = next(m for m in shards if m.shard_offsets == [r0, c0 // BLOCK] and m.placement.rank() == rank)
        local.append(Shard(tensor[:, None].expand(r1 - r0, (c1 - c0) // BLOCK).contiguous(), place))
    properties = state.metadata().tensor_properties
    metadata = ShardedTensorMetadata(shards, torch.Size([rows, dim // BLOCK]), properties)
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, metadata)


def _fused_entries(net: DistributedModelParallel, prefix: str) -> Iterator[tuple[str, ShardedTensor, ShardedTensor]]:
    """``(DCP key, state, table)`` of this rank's fused optimizer states."""
    for path, key, state, weight in _optimizer_states(net):
        kind = ROW_WISE if state.dim() == 1 else ELEMENT_WISE
        yield f"{kind}/{prefix}{path}/{key}", state, weight


def sharded_state_dict(net: DistributedModelParallel, prefix: str = "") -> dict[str, ShardedTensor]:
    """What :func:`save_sharded_state` writes: the sharded weights (``prefix`` + their state-dict key) and the fused
    optimizer states (``fused_optimizer/{prefix}{path}/{table}.{i}``, row-wise ones as column blocks)."""
    out: dict[str, ShardedTensor] = {prefix + k: v for k, v in net.state_dict().items() if isinstance(v, ShardedTensor)}
    check_sharded_layout(net)
    for key, state, weight in _fused_entries(net, prefix):
        out[key] = _row_wise_blocks(weight, state) if key.startswith(ROW_WISE) else state
    return out


def save_sharded_state(net: DistributedModelParallel, folder: str | Path, prefix: str = "") -> None:
    """Write this rank's shards of ``net`` into ``folder`` (a collective: every rank calls it; an existing
    ``folder`` is replaced). A checkpoint names a new folder each save (see :func:`save_checkpoint_shards`), so a
    crash mid-save never touches the folder its file names."""
    folder = Path(folder)
    if dist.get_rank() == 0 and folder.exists():
        shutil.rmtree(folder)
    dist.barrier()
    dcp.save(sharded_state_dict(net, prefix), storage_writer=dcp.FileSystemWriter(folder))
    dist.barrier()


def save_checkpoint_shards(net: DistributedModelParallel, checkpoint: str | Path, prefix: str = "") -> str:
    """Write ``net``'s shards for the checkpoint file ``checkpoint`` into a new folder beside it,
    ``<checkpoint>.shards-<token>`` (a collective; rank 0 draws the token), and return that folder's name for the
    file to record. The file, written afterwards, is the commit: until it is in place the previous file still names
    its own, untouched folder; :func:`remove_stale_shards` then deletes the others."""
    token = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    folder = Path(checkpoint).with_name(f"{Path(checkpoint).name}.shards-{token[0]}")
    save_sharded_state(net, folder, prefix)
    return folder.name


def _shards_folders(checkpoint: str | Path) -> list[Path]:
    """Every shards folder of the checkpoint file ``checkpoint``: ``<name>.shards-<token>``, and the layouts of
    earlier versions (``<name>.shards`` and its ``.tmp`` staging folder)."""
    path = Path(checkpoint)
    names = (f"{path.name}.shards", f"{path.name}.shards.tmp")
    return [
        p
        for p in path.parent.glob(f"{glob.escape(path.name)}.shards*")
        if p.is_dir() and (p.name in names or p.name.startswith(f"{path.name}.shards-"))
    ]


def remove_stale_shards(checkpoint: str | Path, keep: str | None = None) -> None:
    """Delete the shards folders of ``checkpoint`` but ``keep`` (the one its file names): those of earlier saves
    and those a crashed save left behind."""
    for folder in _shards_folders(checkpoint):
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


def _saved_entries(folder: Path) -> dict[str, TensorStorageMetadata]:
    if not (folder / ".metadata").is_file():
        raise ValueError(
            f"No sharded checkpoint in {folder} (its .metadata is missing): the checkpoint file was copied without "
            "its shards folder, or the save did not finish. Copy the folder beside the file, or save again."
        )
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k: v for k, v in saved.items() if isinstance(v, TensorStorageMetadata)}


def load_sharded_checkpoint(net: DistributedModelParallel, folder: str | Path, prefix: str = "") -> None:
    """Load what :func:`save_sharded_state` wrote (on any number of ranks, any plan) into ``net``'s shards, weights
    and fused optimizer state; a collective. Saved entries must be this model's, with the same shapes."""
    folder = Path(folder)
    saved = _saved_entries(folder)
    targets = sharded_state_dict(net, prefix)
    model = {key: tuple(target.size()) for key, target in targets.items()}
    check_saved_shapes(f"the sharded checkpoint {folder}", {k: tuple(v.size) for k, v in saved.items()}, model)
    dcp.load(targets, storage_reader=dcp.FileSystemReader(folder))  # weights and element-wise states in place
    states = {key: (state, weight) for key, state, weight in _fused_entries(net, prefix)}
    with torch.no_grad():
        for key, (state, weight) in states.items():
            if not key.startswith(ROW_WISE):
                continue
            blocks = {tuple(s.metadata.shard_offsets): s.tensor for s in targets[key].local_shards()}
            for (r0, _, c0, c1), tensor in _local_places(weight, state):
                loaded = blocks[(r0, c0 // BLOCK)]
                tensor.copy_(_column_mean(_block_offsets(c1 - c0), loaded.T, 0, c1 - c0))


def read_sharded_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], OptimizerState, ColumnShards]:
    """The consolidated export of a sharded checkpoint, on one process (no process group needed): the tables'
    weights by state-dict key, the fused optimizer state in one process's layout (row-wise states ``[rows]``, the
    mean of their blocks) and, for row-wise states whose blocks differ, the blocks as column shards
    (``{"column_offsets": [0, 4, ..., dim], "values": [dim / 4, rows]}``, see ``sharded_state``) so that shards
    reload exactly."""
    folder = Path(folder)
    saved = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in _saved_entries(folder).items()}
    with warnings.catch_warnings():  # DCP warns that it loads on one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(saved, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    weights: dict[str, torch.Tensor] = {}
    optimizer: OptimizerState = {}
    column_shards: ColumnShards = {}
    for key, value in saved.items():
        kind, _, rest = key.partition("/")
        if kind not in (ELEMENT_WISE, ROW_WISE):
            weights[key] = value
            continue
        path, key_in_path = rest.rsplit("/", 1)
        if kind == ELEMENT_WISE:
            optimizer.setdefault(path, {})[key_in_path] = value
            continue
        offsets = _block_offsets(value.shape[1] * BLOCK)
        optimizer.setdefault(path, {})[key_in_path] = _column_mean(offsets, value.T, 0, int(offsets[-1]))
        if not torch.equal(value, value[:, :1].expand_as(value)):
            column_shards.setdefault(path, {})[key_in_path] = {"column_offsets": offsets, "values": value.T.clone()}
    return weights, optimizer, column_shards


def load_dense_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a sharded checkpoint file's ``state_dict`` (every entry but the sharded tables) into ``module``."""
    targets = {k: v for k, v in module.state_dict().items() if not isinstance(v, ShardedTensor)}
    missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint's dense entries do not match the model: {len(missing)} missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]}). Load it into the model that wrote it."
        )
    with torch.no_grad():
        for key, target in targets.items():
            copy_same_shape(key, target, state[key])


def is_sharded_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint dict keeps its tables in a shards folder (written by several ranks)."""
    return SHARDS_KEY in checkpoint


def sharded_checkpoint_error(checkpoint: Mapping[str, Any]) -> ValueError:
    """The error of loading a sharded checkpoint where only a one-file checkpoint loads."""
    return ValueError(
        f"This checkpoint keeps its tables in the folder {checkpoint[SHARDS_KEY]!r} beside it (written by several "
        "ranks): load it with the torchrec strategy (--trainer.strategy torchrec, any number of devices), or "
        "consolidate it into one file first: python -m recsys_embed.training.distributed_checkpoint CKPT OUT.ckpt"
    )


def consolidated_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint file ``path`` as one process's checkpoint: if its tables are in a shards folder, they are
    read (see :func:`read_sharded_state`) into ``state_dict``, ``fused_optimizer_state`` and
    ``fused_optimizer_column_shards``, the layout a one-process or consolidated sharded run writes."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    folder = checkpoint.pop(SHARDS_KEY, None)
    if folder is None:
        return checkpoint
    weights, optimizer, column_shards = read_sharded_state(Path(path).with_name(folder))
    checkpoint["state_dict"] = {**checkpoint["state_dict"], **weights}
    checkpoint["fused_optimizer_state"] = optimizer
    checkpoint["fused_optimizer_column_shards"] = column_shards
    return checkpoint


def consolidate_checkpoint(path: str | Path, out: str | Path) -> None:
    """Write the sharded checkpoint ``path`` (its file and shards folder) as the one file ``out`` (one process,
    host memory for the whole model), which ``CTRTask.load_from_checkpoint`` and ``recsys-embed predict`` take."""
    if Path(out).resolve() == Path(path).resolve():
        raise ValueError(f"Write the consolidated checkpoint to another file than {path} (its shards need it).")
    torch.save(consolidated_checkpoint(path), out)


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint file and its shards folders, if any (those of crashed saves too)."""
    Path(path).unlink(missing_ok=True)
    remove_stale_shards(path)


def remove_checkpoints(folder: str | Path) -> None:
    """Delete every checkpoint file (``*.ckpt``) in ``folder`` and every shards folder, also those of a crashed
    first save (whose file was never written)."""
    folder = Path(folder)
    for path in folder.glob("*.ckpt"):
        remove_checkpoint(path)
    for path in folder.glob("*.ckpt.shards*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m recsys_embed.training.distributed_checkpoint CKPT OUT``: consolidate a sharded checkpoint."""
    parser = argparse.ArgumentParser(description="Write a sharded checkpoint (CKPT and CKPT.shards/) as one file.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        consolidate_checkpoint(args.checkpoint, args.out)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()

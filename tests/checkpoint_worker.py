"""One rank of the sharded-checkpoint tests (``tests/test_sharded_checkpoints.py`` starts it on 2 processes).

``python tests/checkpoint_worker.py DATA_DIR OUT_DIR`` with torchrun's environment. For each sharding type of
``SHARDING_TYPES`` and each model of ``MODELS`` (registered methods and the mixed pooled/unpooled test method), with
column-wise shards ``COLUMN_SHARD_DIM`` wide (so dim-8 tables split in two), on rank 0 it writes ``{case}.pt``::

    one           the model trained STEPS steps on one process (fused tables): {"weights", "optimizer"}
    one_to_two    ``one`` loaded into shards and gathered back: {"weights", "optimizer", "column_shards"}
    two           that sharded model trained STEPS more steps on the two ranks, gathered: same keys
    two_preds     its predictions on held-out features
    two_to_two    ``two`` loaded into fresh shards of the same plan: largest difference of every rank's local
                  weight and optimizer shards to the trained model's ({"weights", "optimizer", "shards"})
    plan          {table: sharding type}
    owners        {DCP key: [[rank, offsets], ...]} of every shard that ``{case}.shards`` holds
    dcp_two_to_two  as ``two_to_two``, loaded from ``{case}.shards`` (``two`` saved by DCP, each rank its shards)
    dcp_cross     {"plan": another sharding type, "differences": ...}: ``{case}.shards`` and the export loaded
                  into shards of that plan, compared

and ``errors.json`` (every rank's messages of loading a state with an unexpected, a missing or a misshapen entry into
shards, and a sharded checkpoint into another model or other table sizes). Then it fits
:class:`~recsys_embed.training.CTRTask` with the ``torchrec`` strategy column-wise (``lightning.ckpt`` and its shards
folder; ``lightning.consolidated.ckpt``, the same state gathered into one file; ``removed.ckpt``, saved and removed
with crashed saves' folders beside it) and resumes it at its last step (``lightning.resumed.ckpt``; then
``crash.ckpt``/``stale.ckpt`` and ``crash.json``, see :func:`crashed_saves`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_embed.data import CTRDataModule  # noqa: E402
from recsys_embed.methods import Budget, SparseOptimizer, build_embedding  # noqa: E402
from recsys_embed.methods.fused import FusedTables, dense_parameters, fuse_tables  # noqa: E402
from recsys_embed.training import CTRTask, EmbeddingSpec, TorchRecStrategy, shard_model  # noqa: E402
from recsys_embed.training.distributed_checkpoint import (  # noqa: E402
    load_sharded_checkpoint,
    save_sharded_state,
    sharded_state_dict,
)
from recsys_embed.training.sharded_state import (  # noqa: E402
    consolidated_state_dict,
    gather_optimizer_state,
    load_sharded_optimizer_state,
    load_sharded_state,
)
from tests.conftest import make_tables, random_kjt  # noqa: E402
from tests.sharded_worker import MixedNet, bag_rows  # noqa: E402

SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
#: registered methods (name -> budget) and "mixed" (pooled, unpooled with element-wise Adagrad, fp16)
MODELS: dict[str, Budget | None] = {"full": None, "hash": Budget(ratio=4), "qr": Budget(ratio=4), "mixed": None}
COLUMN_SHARD_DIM = 4
TABLES = (7, 50, 300, 40, 120)
STEPS = 3
BATCH = 32
OPTIMIZER = SparseOptimizer(lr=0.1)  # row-wise Adagrad
LIGHTNING_STEPS = 4


def cases() -> list[tuple[str, str]]:
    """(sharding type, model); unpooled tables have no table-column-wise sharding, so "mixed" skips it."""
    return [(s, m) for s in SHARDING_TYPES for m in MODELS if not (m == "mixed" and s == "table_column_wise")]


class MethodNet(nn.Module):
    """A registered method and a linear head: ``KJT -> logits``."""

    def __init__(self, name: str, tables: list[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.emb = build_embedding(name, tables, budget=MODELS[name])
        self.head = nn.Linear(sum(t.embedding_dim for t in tables), 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.emb(features).values()).squeeze(-1)


def build(model: str, tables: list[EmbeddingBagConfig]) -> nn.Module:
    torch.manual_seed(0)
    return MixedNet(tables) if model == "mixed" else MethodNet(model, tables)


def train(net: nn.Module, tables: list[EmbeddingBagConfig], world: int, rank: int, seed: int) -> None:
    """STEPS steps of the global batch, each rank taking its share."""
    dense = torch.optim.SGD(dense_parameters(net), lr=0.1)
    share = BATCH // world
    for step in range(STEPS):
        features = random_kjt(tables, BATCH, seed=seed + step)
        labels = torch.randint(0, 2, (BATCH,), generator=torch.Generator().manual_seed(seed + step)).float()
        local = slice(rank * share, (rank + 1) * share)
        loss = F.binary_cross_entropy_with_logits(net(bag_rows(features, local.start, local.stop)), labels[local])
        dense.zero_grad()
        loss.backward()
        dense.step()


def gathered(net: nn.Module) -> dict[str, Any]:
    """The consolidated export, copied (its unsharded entries are the live parameters)."""
    state, column_shards = gather_optimizer_state(net)
    weights = {k: v.detach().clone() for k, v in consolidated_state_dict(net).items()}
    return {"weights": weights, "optimizer": state, "column_shards": column_shards}


def local_shards(net: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shards of every sharded weight and fused optimizer state, by key and offsets."""
    found = {}
    states = {
        f"opt/{p}/{n}": t for p, named in net.fused_optimizer.state_dict()["state"].items() for n, t in named.items()
    }
    for key, value in {**net.state_dict(), **states}.items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                found[f"{key}@{shard.metadata.shard_offsets}"] = shard.tensor.detach().clone()
    return found


def largest_difference(trained: dict[str, torch.Tensor], restored: dict[str, torch.Tensor], optimizer: bool) -> float:
    """The largest difference between the weight shards (or the optimizer state shards) of two sharded models."""
    assert set(trained) == set(restored), (sorted(trained), sorted(restored))
    picked = [k for k in trained if k.startswith("opt/") == optimizer]
    assert picked, sorted(trained)
    return max(float((trained[k].float() - restored[k].float()).abs().max()) for k in picked)


def shard(model: str, tables: list[EmbeddingBagConfig], sharding_type: str) -> Any:
    return shard_model(
        build(model, tables),
        OPTIMIZER,
        device=torch.device("cpu"),
        sharding_types=[sharding_type],
        column_shard_dim=COLUMN_SHARD_DIM,
    )


def run_case(sharding_type: str, model: str, world: int, rank: int, out_dir: Path) -> dict[str, Any]:
    tables = make_tables(TABLES)
    one = build(model, tables)
    fuse_tables(one, OPTIMIZER)
    train(one, tables, world=1, rank=0, seed=0)  # every rank alike: the one-process run
    one_optimizer = {n: m.optimizer_state() for n, m in one.named_modules() if isinstance(m, FusedTables)}
    one_state = {"weights": {k: v.detach().clone() for k, v in one.state_dict().items()}, "optimizer": one_optimizer}
    net = shard(model, tables, sharding_type)
    load_sharded_state(net, one_state["weights"])
    load_sharded_optimizer_state(net, one_state["optimizer"])
    result: dict[str, Any] = {"one": one_state, "one_to_two": gathered(net)}
    train(net, tables, world=world, rank=rank, seed=100)
    result["two"] = gathered(net)
    with torch.no_grad():
        result["two_preds"] = net(random_kjt(tables, 16, seed=1234))
    trained_shards = local_shards(net)
    saved = [result["two"]]
    dist.broadcast_object_list(saved, src=0)  # what a checkpoint file gives every rank
    fresh = shard(model, tables, sharding_type)
    load_sharded_state(fresh, saved[0]["weights"])
    load_sharded_optimizer_state(fresh, saved[0]["optimizer"], column_shards=saved[0]["column_shards"])
    result["two_to_two"] = all_differences(trained_shards, local_shards(fresh), world)
    result["plan"] = {f"{p}.{t}": s.sharding_type for p, tp in net.plan.plan.items() for t, s in tp.items()}
    folder = out_dir / f"{sharding_type}.{model}.shards"
    save_sharded_state(net, folder)
    result["owners"] = owners(net, rank, world)
    from_shards = shard(model, tables, sharding_type)
    load_sharded_checkpoint(from_shards, folder)
    result["dcp_two_to_two"] = all_differences(trained_shards, local_shards(from_shards), world)
    other = next(
        s for s in SHARDING_TYPES[SHARDING_TYPES.index(sharding_type) + 1 :] + SHARDING_TYPES if (s, model) in cases()
    )
    cross, reference = shard(model, tables, other), shard(model, tables, other)
    load_sharded_checkpoint(cross, folder)
    load_sharded_state(reference, saved[0]["weights"])
    load_sharded_optimizer_state(reference, saved[0]["optimizer"], column_shards=saved[0]["column_shards"])
    result["dcp_cross"] = {
        "plan": other,
        "differences": all_differences(local_shards(reference), local_shards(cross), world),
    }
    if (sharding_type, model) == cases()[0]:  # every rank alike
        result["errors"] = error_messages(net, saved[0], folder)
    return result


def all_differences(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], world: int) -> list[Any]:
    """Every rank's largest differences of weight and optimizer shards (see :func:`largest_difference`)."""
    mine = {
        "weights": largest_difference(expected, got, optimizer=False),
        "optimizer": largest_difference(expected, got, optimizer=True),
        "shards": len(expected),
    }
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def owners(net: nn.Module, rank: int, world: int) -> dict[str, list[tuple[int, list[int]]]]:
    """Which rank holds each shard of what :func:`save_sharded_state` writes."""
    mine = [
        (k, rank, list(s.metadata.shard_offsets)) for k, v in sharded_state_dict(net).items() for s in v.local_shards()
    ]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    found: dict[str, list[tuple[int, list[int]]]] = {}
    for key, owner, offsets in (entry for entries in everyone for entry in entries):
        found.setdefault(key, []).append((owner, offsets))
    return found


def error_messages(net: nn.Module, saved: dict[str, Any], folder: Path) -> list[dict[str, str]]:
    """Every rank's messages of loading states with one unexpected or one missing entry or one of another shape,
    and shards into another model (each attempt after the last: a rank that went on alone would hang or mismatch)."""
    weights, optimizer = saved["weights"], saved["optimizer"]
    path = next(iter(optimizer))
    attempts = {
        "weights_unexpected": lambda: load_sharded_state(net, {**weights, "emb.extra.weight": torch.zeros(1)}),
        "weights_missing": lambda: load_sharded_state(net, dict(list(weights.items())[1:])),
        "optimizer_unexpected": lambda: load_sharded_optimizer_state(
            net, {**optimizer, path: {**optimizer[path], "t9.0": torch.zeros(1)}}
        ),
        "optimizer_missing": lambda: load_sharded_optimizer_state(
            net, {p: s for p, s in optimizer.items() if p != path}
        ),
        "optimizer_other_shape": lambda: load_sharded_optimizer_state(  # t0 is on one rank only (table-wise)
            net, {**optimizer, path: {**optimizer[path], "t0.0": torch.zeros(TABLES[0], 8)}}
        ),
        "shards_other_model": lambda: load_sharded_checkpoint(
            shard("mixed", make_tables(TABLES), "table_wise"), folder
        ),
        "shards_other_shapes": lambda: load_sharded_checkpoint(  # t0: 8 rows, not 7
            shard("full", make_tables((8, *TABLES[1:])), "table_wise"), folder
        ),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except ValueError as error:
            messages[name] = str(error)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, messages)
    return everyone


def lightning_trainer(strategy: Any = "auto", world: int = 1) -> pl.Trainer:
    """A quiet CPU trainer of LIGHTNING_STEPS steps without validation, logs or automatic checkpoints."""
    return pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=LIGHTNING_STEPS,
        limit_val_batches=0,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def lightning_runs(data_dir: str, out_dir: Path, world: int) -> None:
    """Fit CTRTask column-wise on the ranks and save; then resume at the last step and save again."""
    for ckpt_path, name in ((None, "lightning.ckpt"), (out_dir / "lightning.ckpt", "lightning.resumed.ckpt")):
        pl.seed_everything(0)
        data = CTRDataModule(data_dir=data_dir, batch_size=64 // world, shuffle=True)
        task = CTRTask(data.cardinalities, data.num_dense, 8, EmbeddingSpec("qr", Budget(ratio=4)))
        strategy = TorchRecStrategy(sharding_types=["column_wise"], column_shard_dim=COLUMN_SHARD_DIM)
        trainer = lightning_trainer(strategy, world)
        trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
        trainer.save_checkpoint(out_dir / name)
        if ckpt_path is None:
            trainer.save_checkpoint(out_dir / "removed.ckpt")
            if trainer.is_global_zero:  # what crashed saves of earlier versions and of this one leave behind
                (out_dir / "removed.ckpt.shards.tmp").mkdir()
                (out_dir / "removed.ckpt.shards-0123456789ab").mkdir()
            trainer.strategy.barrier()
            trainer.strategy.remove_checkpoint(out_dir / "removed.ckpt")
            strategy.checkpoint_format = "consolidated"
            trainer.save_checkpoint(out_dir / "lightning.consolidated.ckpt")
            strategy.checkpoint_format = "sharded"
        else:
            crashed_saves(trainer, out_dir)
        trainer.strategy.barrier()


def crashed_saves(trainer: pl.Trainer, out_dir: Path) -> None:
    """``crash.ckpt`` and ``stale.ckpt`` saved, the tables changed, then saves of both that crash after the shards
    are written, before the file: ``crash.ckpt`` must still load as saved. Then ``stale.ckpt`` (beside a crashed
    save's folder and an earlier version's staging folder) is saved again; ``crash.json`` lists the folders."""
    for name in ("crash.ckpt", "stale.ckpt"):
        trainer.save_checkpoint(out_dir / name)
    with torch.no_grad():
        for value in trainer.lightning_module.net.state_dict().values():
            if isinstance(value, ShardedTensor):
                for piece in value.local_shards():
                    piece.tensor.add_(1.0)
    io = trainer.strategy.checkpoint_io

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("simulated crash before the checkpoint file is written")

    io.save_checkpoint = crash  # type: ignore[method-assign]  # rank 0 writes the file
    for name in ("crash.ckpt", "stale.ckpt"):
        try:
            trainer.save_checkpoint(out_dir / name)
        except OSError:  # rank 0 only: it meets the other ranks at the barrier its save did not reach
            trainer.strategy.barrier()
    del io.save_checkpoint
    folders = lambda name: sorted(p.name for p in out_dir.glob(f"{name}.shards*"))  # noqa: E731
    listing = {"crashed": folders("crash.ckpt")}
    if trainer.is_global_zero:
        (out_dir / "stale.ckpt.shards.tmp").mkdir()
    trainer.strategy.barrier()
    trainer.save_checkpoint(out_dir / "stale.ckpt")
    listing["saved_again"] = folders("stale.ckpt")
    if trainer.is_global_zero:
        (out_dir / "crash.json").write_text(json.dumps(listing))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    dist.init_process_group("gloo")
    for sharding_type, model in cases():
        result = run_case(sharding_type, model, world, rank, args.out_dir)
        if rank == 0:
            errors = result.pop("errors", None)
            if errors is not None:
                (args.out_dir / "errors.json").write_text(json.dumps(errors))
            torch.save(result, args.out_dir / f"{sharding_type}.{model}.pt")
    lightning_runs(args.data_dir, args.out_dir, world)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # all work is done and written: skip the interpreter's teardown, where a library thread (gloo/fbgemm) now and
    # then aborts the process ("terminate called without an active exception") and fails a run that succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

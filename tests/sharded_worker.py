"""One rank of the sharding tests (``tests/test_sharding.py`` starts it once per rank, like ``torchrun``).

``python tests/sharded_worker.py DATA_DIR OUT_DIR [--load CKPT_DIR] [--memory-cap BYTES]`` with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set. For each method in ``METHODS`` it trains
``STEPS`` steps (plain fused tables on one process, the ``torchrec`` strategy on several), recording the global
loss of every step, and writes on rank 0: ``{method}.losses.json``, ``{method}.ckpt`` (the final checkpoint) and
``{method}.preds.pt`` (predictions on the first validation batch). With ``--load`` it also restores
``CKPT_DIR/{method}.ckpt`` through the strategy and writes ``{method}.loaded_preds.pt``, then resumes ``fit`` from
it at its last step (nothing to train) and saves ``{method}.resumed.ckpt``. With ``--memory-cap`` it
only plans (an impossible cap) and writes each rank's error to ``plan_error.{rank}.txt``. With ``--forward-all``
it shards every registered method (no training) and writes, per method, the largest difference between its sharded
and unsharded outputs to ``forward_diff.json``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_embed.data import CTRDataModule  # noqa: E402
from recsys_embed.methods import Budget, SparseOptimizer, available_methods, build_embedding  # noqa: E402
from recsys_embed.training import CTRTask, EmbeddingSpec, ShardingPlanError, TorchRecStrategy, shard_model  # noqa: E402
from tests.conftest import budget_for, make_tables, method_options, random_kjt  # noqa: E402

METHODS = {"full": None, "qr": Budget(ratio=4), "unified": Budget(ratio=4)}
STEPS = 8
BATCH = 256  # global batch; each of N ranks gets BATCH / N rows


class GlobalLoss(pl.Callback):
    """The mean over ranks of each step's loss (= the loss of the global batch, ranks having equal shares)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def make(method: str, world: int, data_dir: str, memory_cap: int | None = None) -> tuple[Any, ...]:
    pl.seed_everything(0)
    data = CTRDataModule(data_dir=data_dir, batch_size=BATCH // world, eval_batch_size=500, shuffle=True)
    task = CTRTask(
        data.cardinalities, data.num_dense, 8, EmbeddingSpec(method, METHODS[method]), id_counts_dir=data_dir
    )
    recorder = GlobalLoss()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=TorchRecStrategy(memory_cap_bytes=memory_cap) if world > 1 else "auto",
        max_steps=STEPS,
        limit_val_batches=0,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    return data, task, trainer, recorder


def predictions(task: CTRTask, data: CTRDataModule) -> torch.Tensor:
    """Predictions for the whole first validation batch of one process (every rank feeds the same rows)."""
    data.trainer = None  # read the split as one process would
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        return task(batch)


def forward_differences() -> dict[str, float]:
    """Every registered method, sharded over the process group, against itself unsharded (same weights)."""
    tables = make_tables((7, 50, 3000, 400))
    kjt = random_kjt(tables, 16, seed=1)
    dist.init_process_group("gloo")
    diffs = {}
    for name in available_methods():
        torch.manual_seed(0)
        method = build_embedding(name, tables, budget=budget_for(name), **method_options(name, tables))
        with torch.no_grad():
            expected = method(kjt).values()
            sharded = shard_model(torch.nn.ModuleDict({"m": method}), SparseOptimizer(), device=torch.device("cpu"))
            diffs[name] = float((sharded.module["m"](kjt).values() - expected).abs().max())
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--memory-cap", type=int)
    parser.add_argument("--forward-all", action="store_true")
    args = parser.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.forward_all:
        diffs = forward_differences()
        if rank == 0:
            (args.out_dir / "forward_diff.json").write_text(json.dumps(diffs))
        dist.destroy_process_group()
        return
    if args.memory_cap is not None:
        data, task, trainer, _ = make("full", world, args.data_dir, args.memory_cap)
        try:
            trainer.fit(task, datamodule=data)
        except ShardingPlanError as error:
            (args.out_dir / f"plan_error.{rank}.txt").write_text(str(error))
        return
    for method in METHODS:
        data, task, trainer, recorder = make(method, world, args.data_dir)
        trainer.fit(task, datamodule=data)
        trainer.save_checkpoint(args.out_dir / f"{method}.ckpt")
        preds = predictions(task, data)
        if rank == 0:
            (args.out_dir / f"{method}.losses.json").write_text(json.dumps(recorder.losses))
            torch.save(preds, args.out_dir / f"{method}.preds.pt")
        if args.load is not None:
            data, task, trainer, _ = make(method, world, args.data_dir)
            trainer.validate(task, datamodule=data, ckpt_path=args.load / f"{method}.ckpt")
            preds = predictions(task, data)
            if rank == 0:
                torch.save(preds, args.out_dir / f"{method}.loaded_preds.pt")
            # resume fit at its last step: restores weights and fused optimizer state, trains nothing, saves again
            data, task, trainer, _ = make(method, world, args.data_dir)
            trainer.fit(task, datamodule=data, ckpt_path=args.load / f"{method}.ckpt")
            trainer.save_checkpoint(args.out_dir / f"{method}.resumed.ckpt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Training throughput with TorchRec sharding on 1 vs 2 CPU processes (gloo), same global batch, same data.

DLRM on the default synthetic Criteo-shaped data (26 tables, 10..1M ids, dim 16). Each setup runs in its own
subprocess, through Lightning, for ``--warmup`` + ``--steps`` steps; the table reports the median step time after
warm-up (the slowest rank's, as ranks wait for each other) and rows/s for the global batch:

* ``1 process, fused``: the default strategy (fbgemm tables fused in one process, all cores);
* ``1 process, torchrec``: ``--trainer.strategy torchrec --trainer.devices 1`` (DistributedModelParallel on one rank);
* ``2 processes, torchrec``: ``--trainer.devices 2`` (tables sharded over the two ranks, cores split between them).

::

    python benchmarks/sharding_throughput.py [--methods full qr] [--batch-size 4096] [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_embed.data import CTRDataModule  # noqa: E402
from recsys_embed.methods import Budget  # noqa: E402
from recsys_embed.training import CTRTask, EmbeddingSpec, TorchRecStrategy  # noqa: E402

SETUPS = [("1 process, fused", 1, False), ("1 process, torchrec", 1, True), ("2 processes, torchrec", 2, True)]


class StepClock(pl.Callback):
    """Wall time between consecutive train-batch starts."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())


def worker(args: argparse.Namespace) -> None:
    pl.seed_everything(0)
    data = CTRDataModule(batch_size=args.batch_size // args.processes, shuffle=True)
    budget = None if args.method == "full" else Budget(ratio=args.ratio)
    task = CTRTask(data.cardinalities, data.num_dense, 16, EmbeddingSpec(args.method, budget))
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.processes,
        strategy=TorchRecStrategy() if args.torchrec else "auto",
        max_steps=args.warmup + args.steps + 1,
        limit_val_batches=0,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(task, datamodule=data)
    steps = [b - a for a, b in zip(clock.starts[args.warmup :], clock.starts[args.warmup + 1 :])]
    if trainer.global_rank == 0:
        Path(args.out).write_text(json.dumps({"step_ms": 1000 * statistics.median(steps)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["full", "qr"])
    parser.add_argument("--ratio", type=float, default=10.0, help="compression ratio of the non-full methods")
    parser.add_argument("--batch-size", type=int, default=4096, help="global batch (split over the processes)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--torchrec", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    print(f"global batch {args.batch_size}, median of {args.steps} steps after {args.warmup} warm-up steps\n")
    print("| method | setup | step ms | rows/s | speed vs 1 process, fused |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        baseline = None
        for label, processes, torchrec in SETUPS:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                command = [sys.executable, __file__, "--worker", "--method", method, "--ratio", str(args.ratio)]
                command += [*common, "--processes", str(processes), "--out", str(out)]
                subprocess.run(command + (["--torchrec"] if torchrec else []), check=True, capture_output=True)
                step_ms = json.loads(out.read_text())["step_ms"]
            baseline = baseline or step_ms
            rows = args.batch_size / step_ms * 1000
            print(f"| {method} | {label} | {step_ms:.1f} | {rows:,.0f} | {baseline / step_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

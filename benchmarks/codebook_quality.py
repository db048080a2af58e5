"""Short synthetic runs of ``dpq`` and ``mgqe`` against ``hash`` (same bytes) and ``full``, with centroid usage.

Each codebook method is trained at each asked ratio; ``hash`` is then trained at exactly the bytes the codebook
method reached (``budget.bytes``), so the comparison is at equal memory. Centroid usage (the share of a table's
centroids some id's served code uses, averaged over the coded tables) is read from the trained form.

    python benchmarks/codebook_quality.py [--ratios 4 16] [--train-rows 200000] [--reseed-every 10] [--ablate-reseed 0]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
from pathlib import Path

from recsys_embed.cli import main as cli
from recsys_embed.training import CTRTask

CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "ctr" / "synthetic_dlrm.yaml")


def fit(folder: Path, method: str, *extra: str, data: list[str]) -> tuple[float, CTRTask]:
    """Train one run in ``folder``; its test AUC and the trained task (last checkpoint)."""
    folder.mkdir(parents=True)
    os.chdir(folder)  # the config writes runs/synthetic_dlrm/ under the working directory
    cli(["fit", "--config", CONFIG, "--test_after_fit=true", "--trainer.enable_progress_bar=false",
         f"--model.embedding.method={method}", *data, *extra])  # fmt: skip
    metrics = next(folder.glob("runs/**/metrics.csv"))
    auc = next(float(r["test/auc"]) for r in csv.DictReader(metrics.open()) if r.get("test/auc"))
    task = CTRTask.load_from_checkpoint(next(folder.glob("runs/**/last.ckpt")), weights_only=False)
    return auc, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="*", default=[4.0, 16.0])
    parser.add_argument("--methods", nargs="*", default=["dpq", "mgqe"])
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--reseed-every", type=int, default=10, help="the methods' reseed_every (short runs)")
    parser.add_argument("--ablate-reseed", type=int, default=0, help="also run each method at the first ratio so")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = [f"--data.synthetic.train_rows={args.train_rows}", "--data.synthetic.val_rows=20000",
            "--data.synthetic.test_rows=50000"]  # fmt: skip

    def row(name: str, reached: float, asked: object, auc: float, usage: str) -> None:
        print(f"| {name} | {reached:.2f} | {asked} | {auc:.4f} | {usage} |", flush=True)

    print("| method | ratio reached | asked | test AUC | centroid usage |\n|---|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        row("full", 1.0, "-", fit(Path(tmp) / "full", "full", data=data)[0], "-")
        cells = [(r, m, args.reseed_every) for r in args.ratios for m in args.methods]
        cells += [(args.ratios[0], m, args.ablate_reseed) for m in args.methods]
        for i, (ratio, method, every) in enumerate(cells):
            options = f"--model.embedding.options={{reseed_every: {every}}}"
            budget = f"--model.embedding.budget.ratio={ratio}"
            auc, task = fit(Path(tmp) / f"{i}-{method}", method, budget, options, data=data)
            usage = task.embedding.centroid_usage()
            reached, nbytes = task.embedding.compression_ratio(), task.embedding.memory_bytes()
            row(f"{method} (reseed_every {every})", reached, ratio, auc, f"{sum(usage.values()) / len(usage):.3f}")
            if i < len(args.ratios) * len(args.methods):  # hash at exactly the same bytes
                budget = f"--model.embedding.budget.bytes={nbytes}"
                auc, task = fit(Path(tmp) / f"{i}-hash", "hash", budget, data=data)
                row(f"hash (bytes of {method})", task.embedding.compression_ratio(), ratio, auc, "-")


if __name__ == "__main__":
    main()

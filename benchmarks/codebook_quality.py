"""Short synthetic runs of ``dpq`` and ``mgqe`` against ``hash`` (same bytes) and ``full``, with centroid usage.

Each codebook method is trained at each asked ratio; ``hash`` is then trained at exactly the bytes the codebook
method reached (``budget.bytes``), so the comparison is at equal memory. Centroid usage (the share of a table's
centroids some id's served code uses, averaged over the coded tables) is read from the trained form.

    python benchmarks/codebook_quality.py [--ratios 4 16] [--train-rows 200000] [--reseed-every 10 0]
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
    parser.add_argument("--reseed-every", type=int, nargs="*", default=[10, 0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = [f"--data.synthetic.train_rows={args.train_rows}", "--data.synthetic.val_rows=20000",
            "--data.synthetic.test_rows=50000"]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        full_auc, _ = fit(Path(tmp) / "full", "full", data=data)
        rows.append(("full", 1.0, "-", full_auc, "-"))
        for ratio in args.ratios:
            for method in args.methods:
                for every in args.reseed_every:
                    options = f"--model.embedding.options={{reseed_every: {every}}}"
                    folder = Path(tmp) / f"{method}-{ratio}-{every}"
                    auc, task = fit(folder, method, f"--model.embedding.budget.ratio={ratio}", options, data=data)
                    usage = task.embedding.centroid_usage()
                    mean_usage = sum(usage.values()) / len(usage)
                    reached = task.embedding.compression_ratio()
                    rows.append((f"{method} (reseed_every {every})", reached, ratio, auc, f"{mean_usage:.3f}"))
                nbytes = task.embedding.memory_bytes()
                budget = f"--model.embedding.budget.bytes={nbytes}"
                auc, task = fit(Path(tmp) / f"hash-{method}-{ratio}", "hash", budget, data=data)
                rows.append((f"hash (bytes of {method})", task.embedding.compression_ratio(), ratio, auc, "-"))
    print("| method | ratio reached | asked | test AUC | centroid usage |\n|---|---:|---:|---:|---:|")
    for name, reached, asked, auc, usage in rows:
        print(f"| {name} | {reached:.2f} | {asked} | {auc:.4f} | {usage} |")


if __name__ == "__main__":
    main()

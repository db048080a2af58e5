"""``recsys-embed bench``: run a sweep (resumable, shardable) and build its report; ``bench report`` rebuilds it.

Usage::

    recsys-embed bench [--config SWEEP.yaml] [--quick] [--output DIR] [--shard i/N] [--list]
    recsys-embed bench report --output DIR
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from recsys_embed.benchmark.report import build_report
from recsys_embed.benchmark.runner import describe_counts, run_sweep
from recsys_embed.benchmark.spec import expand_grid, load_spec, parse_shard, shard
from recsys_embed.benchmark.store import load_results
from recsys_embed.console import UsageErrorParser, package_logger

log = logging.getLogger(__name__)

SWEEP_FILE = Path("experiments") / "sweeps" / "default.yaml"
#: the repository's default sweep (an editable install finds it next to the package)
REPO_SWEEP = Path(__file__).resolve().parents[2] / SWEEP_FILE
#: where runs go when --output is not given (``runs/bench/<sweep name>``)
OUTPUT_ROOT = Path("runs") / "bench"


def default_sweep() -> Path:
    """``experiments/sweeps/default.yaml`` of the working directory, else of the repository."""
    return SWEEP_FILE if SWEEP_FILE.is_file() else REPO_SWEEP


def run_parser() -> argparse.ArgumentParser:
    parser = UsageErrorParser(
        prog="recsys-embed bench",
        description=(
            "Benchmark every compression method x memory budget x dataset x model x seed of a sweep spec: one "
            "CTRTask training run per cell, results in parquet (resumable: finished cells are skipped), then a "
            "markdown report and Pareto plot. `recsys-embed bench report --output DIR` rebuilds the report from "
            "the stores under DIR (e.g. after a sharded run)."
        ),
    )
    parser.add_argument("--config", type=Path, default=None, help=f"sweep spec YAML (default: {SWEEP_FILE})")
    parser.add_argument("--quick", action="store_true", help="apply the spec's `quick:` overrides (CI-sized run)")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"output folder (default: {OUTPUT_ROOT}/<sweep name>)"
    )
    parser.add_argument(
        "--shard", default="0/1", help="run shard i of N (a deterministic partition of the grid), e.g. 2/8"
    )
    parser.add_argument("--list", action="store_true", help="print this shard's cells and exit")
    parser.add_argument("--no-report", action="store_true", help="do not build the report after the run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="also show Lightning's and the task's log lines")
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = UsageErrorParser(
        prog="recsys-embed bench report",
        description="Rebuild report.md, the Pareto plots and results.parquet from every results store under DIR.",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder holding one or more bench outputs")
    return parser


@contextlib.contextmanager
def console_logging(verbose: bool) -> Iterator[None]:
    """Keep the console to the progress bar and one line per cell (Lightning prints a lot per Trainer).

    The package logs through its own handler only (torchrec's import adds a root handler that would print every
    line twice); levels, propagation and warning filters are restored on exit.
    """
    package_log = logging.getLogger("recsys_embed")
    quiet = [
        "lightning.pytorch",
        "lightning.fabric",
        "recsys_embed.training",
        "recsys_embed.data",
        "recsys_embed.methods",
        "torch.fx._symbolic_trace",  # a deprecation notice per traced model
    ]
    saved = {name: logging.getLogger(name).level for name in quiet}
    saved_state = (package_log.level, package_log.propagate, list(package_log.handlers))
    package_logger()
    with warnings.catch_warnings():
        if not verbose:
            for name in quiet:
                logging.getLogger(name).setLevel(logging.ERROR if name.startswith("torch") else logging.WARNING)
            for pattern in (
                r".*does not have many workers.*",
                r".*IterableDataset.*has `__len__` defined.*",
                r".*is_fx_tracing.*",
                r".*treespec.*",
            ):
                warnings.filterwarnings("ignore", message=pattern)
        try:
            with logging_redirect_tqdm(loggers=[package_log]):
                yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
            package_log.setLevel(saved_state[0])
            package_log.propagate = saved_state[1]
            package_log.handlers[:] = saved_state[2]


def main(argv: list[str]) -> int:
    """Entry point of ``recsys-embed bench``; returns the exit status."""
    if argv[:1] == ["report"]:
        args = report_parser().parse_args(argv[1:])
        with console_logging(verbose=False):
            frame = load_results(args.output)
            path = build_report(args.output, frame)
        print(f"Report: {path} ({len(frame)} cells)")
        return 0
    args = run_parser().parse_args(argv)
    config = args.config or default_sweep()
    spec = load_spec(config, quick=args.quick)
    index, count = parse_shard(args.shard)
    grid = expand_grid(spec)
    cells = shard(grid, index, count)
    output = args.output or OUTPUT_ROOT / spec.name
    if args.list:
        for cell in cells:
            print(cell.cell_id, cell.describe())
        print(f"{len(cells)} of {len(grid)} cells (shard {index}/{count}) from {config}")
        return 0
    with console_logging(args.verbose):
        log.info(
            "Sweep %r from %s: %d of %d cells (shard %d/%d) -> %s",
            spec.name,
            config,
            len(cells),
            len(grid),
            index,
            count,
            output,
        )
        started = time.perf_counter()
        counts = run_sweep(cells, output, progress=not args.no_progress)
        log.info("Sweep done in %.1f min: %s", (time.perf_counter() - started) / 60, describe_counts(counts))
        path = None if args.no_report else build_report(output)
    if path is not None:
        print(f"Report: {path}")
    return 1 if counts["failed"] else 0

"""The benchmark: sweep spec, resumable runner, parquet results store, report with Pareto plots.

Example::

    from recsys_embed.benchmark import build_report, expand_grid, load_spec, run_sweep

    spec = load_spec("experiments/sweeps/default.yaml", quick=True)
    run_sweep(expand_grid(spec), "runs/bench/quick")
    build_report("runs/bench/quick")  # -> runs/bench/quick/report.md
"""

from recsys_embed.benchmark.report import build_report, metric_table
from recsys_embed.benchmark.runner import run_cell, run_sweep
from recsys_embed.benchmark.spec import Cell, SweepSpec, expand_grid, load_spec, parse_shard, parse_spec, shard
from recsys_embed.benchmark.store import ResultStore, load_results

__all__ = [
    "Cell",
    "ResultStore",
    "SweepSpec",
    "build_report",
    "expand_grid",
    "load_results",
    "load_spec",
    "metric_table",
    "parse_shard",
    "parse_spec",
    "run_cell",
    "run_sweep",
    "shard",
]

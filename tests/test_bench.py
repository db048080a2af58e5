"""The benchmark: spec validation, grid and shards, the resumable store, a tiny real sweep, and the report tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from recsys_embed.benchmark import (
    ResultStore,
    build_report,
    expand_grid,
    load_results,
    load_spec,
    metric_table,
    parse_shard,
    parse_spec,
    run_sweep,
    shard,
)
from recsys_embed.benchmark.report import pareto_front, speed_tables
from recsys_embed.benchmark.runner import base_row
from recsys_embed.benchmark.spec import Cell
from recsys_embed.cli import main
from recsys_embed.methods import available_methods

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "experiments" / "sweeps" / "default.yaml"
TINY_DATA = {
    "train_rows": 3000,
    "val_rows": 1000,
    "test_rows": 1000,
    "num_sparse": 4,
    "num_dense": 3,
    "max_cardinality": 2000,
    "seed": 3,
}


def small_spec(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "t",
        "methods": ["all", {"name": "full", "budgets": [1]}],
        "budgets": [4, 16],
        "datasets": [{"name": "tiny", "synthetic": TINY_DATA}],
        "models": ["DLRM"],
        "seeds": [0, 1],
        "training": {"batch_size": 512, "limit_train_batches": 3, "csv_logs": False},
    }
    raw.update(overrides)
    return raw


# ---- spec, grid, shards ---------------------------------------------------------------------------------------


def test_grid_covers_every_registered_method_budget_and_seed() -> None:
    cells = expand_grid(parse_spec(small_spec()))
    methods = available_methods()
    assert len(cells) == (1 + 2 * (len(methods) - 1)) * 2  # full at ratio 1 only, the others at 4 and 16
    assert {c.method.name for c in cells} == set(methods)
    assert {(c.method.name, c.budget) for c in cells if c.method.name == "full"} == {("full", 1.0)}
    assert len({c.cell_id for c in cells}) == len(cells)
    # ids are stable across parses and change with any setting that changes the result
    assert [c.cell_id for c in expand_grid(parse_spec(small_spec()))] == [c.cell_id for c in cells]
    longer = expand_grid(parse_spec(small_spec(training={"batch_size": 512, "limit_train_batches": 4})))
    assert not {c.cell_id for c in longer} & {c.cell_id for c in cells}
    # run order: seed-major, so a partial sweep holds whole seeds
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_partition_the_grid(count: int) -> None:
    cells = expand_grid(parse_spec(small_spec(seeds=[0, 1, 2])))
    shards = [shard(cells, i, count) for i in range(count)]
    ids = [c.cell_id for part in shards for c in part]
    assert sorted(ids) == sorted(c.cell_id for c in cells)  # union is the grid, and nothing twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [c.cell_id for c in shard(list(reversed(cells)), 0, count)] == [  # independent of spec order
        c.cell_id for c in reversed(shards[0])
    ]


def test_parse_shard() -> None:
    assert parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="i/N"):
            parse_shard(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["nope"]}, "Unknown embedding method 'nope'"),
        ({"budgetz": [4]}, r"unknown key\(s\) \['budgetz'\] in the sweep spec"),
        ({"methods": [{"name": "hash", "options": {"rowz": 3}}]}, r"method 'hash' has no option\(s\) \['rowz'\]"),
        ({"methods": [{"name": "hash", "budget": [4]}]}, r"unknown key\(s\) \['budget'\]"),
        ({"models": ["Nope"]}, "unknown model 'Nope'"),
        ({"models": [{"name": "DLRM", "options": {"mlp": [4]}}]}, r"model 'DLRM' has no option\(s\) \['mlp'\]"),
        ({"training": {"epochs": 1}}, r"unknown key\(s\) \['epochs'\] in training"),
        ({"budgets": [0.5]}, "ratios >= 1"),
        ({"datasets": [{"name": "d", "synthetic": {"rows": 5}}]}, r"unknown key\(s\) \['rows'\]"),
        ({"seeds": [0, 0]}, "distinct integers"),
        ({"methods": ["hash", "hash"]}, "distinct labels"),
    ],
)
def test_spec_errors_are_clear(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(small_spec(**change))


def test_default_sweep_spec_and_its_quick_mode() -> None:
    spec = load_spec(DEFAULT_SWEEP)
    assert len(spec.budgets) >= 4
    assert {m.name for m in spec.methods} == set(available_methods())
    quick = load_spec(DEFAULT_SWEEP, quick=True)
    assert quick.name.endswith("-quick")
    assert len(expand_grid(quick)) < len(expand_grid(spec))
    assert quick.datasets[0].synthetic["train_rows"] < spec.datasets[0].synthetic["train_rows"]


# ---- the store and resuming ---------------------------------------------------------------------------------------


def fake_runner(calls: list[str], crash_at: int | None = None) -> Any:
    def run(cell: Cell, output: Path) -> dict[str, Any]:
        if crash_at is not None and len(calls) == crash_at:
            raise KeyboardInterrupt  # a killed process: not caught by the sweep
        calls.append(cell.cell_id)
        return {**base_row(cell), "status": "ok", "test_auc": 0.7, "memory_bytes": 10, "ratio": cell.budget}

    return run


def test_resume_after_a_crash_runs_only_the_missing_cells(tmp_path: Path) -> None:
    cells = expand_grid(parse_spec(small_spec()))
    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cells, tmp_path, runner=fake_runner(first, crash_at=5), progress=False)
    assert len(first) == 5 and len(list((tmp_path / "cells").glob("*.parquet"))) == 5
    (tmp_path / "cells" / ".half-written.parquet.123.tmp").write_bytes(b"PAR1 torn")  # a write cut by SIGKILL
    second: list[str] = []
    counts = run_sweep(cells, tmp_path, runner=fake_runner(second), progress=False)
    assert counts["skipped"] == 5 and counts["ok"] == len(cells) - 5
    assert not set(first) & set(second) and set(first) | set(second) == {c.cell_id for c in cells}
    frame = load_results(tmp_path)
    assert len(frame) == len(cells) and frame["cell_id"].is_unique
    third: list[str] = []
    assert run_sweep(cells, tmp_path, runner=fake_runner(third), progress=False)["skipped"] == len(cells)
    assert third == []


def test_failed_cells_are_recorded_then_retried(tmp_path: Path) -> None:
    cells = expand_grid(parse_spec(small_spec(seeds=[0])))[:3]

    def broken(cell: Cell, output: Path) -> dict[str, Any]:
        raise RuntimeError("boom")

    assert run_sweep(cells, tmp_path, runner=broken, progress=False)["failed"] == 3
    frame = load_results(tmp_path)
    assert set(frame["status"]) == {"failed"} and frame["reason"].str.contains("RuntimeError: boom").all()
    calls: list[str] = []
    assert run_sweep(cells, tmp_path, runner=fake_runner(calls), progress=False)["ok"] == 3
    assert set(load_results(tmp_path)["status"]) == {"ok"} and len(load_results(tmp_path)) == 3


SIGKILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from recsys_embed.benchmark import expand_grid, parse_spec, run_sweep
from recsys_embed.benchmark.runner import base_row
from tests.test_bench import small_spec

calls = []
def run(cell, output):
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(cell.cell_id)
    return {**base_row(cell), "status": "ok", "test_auc": 0.7}

run_sweep(expand_grid(parse_spec(small_spec())), Path(sys.argv[1]), runner=run, progress=False)
"""


def test_sigkill_mid_sweep_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", SIGKILL_SCRIPT, str(tmp_path), "4"], cwd=REPO, env=env)
    assert killed.returncode == -9
    assert len(load_results(tmp_path)) == 4
    done = subprocess.run([sys.executable, "-c", SIGKILL_SCRIPT, str(tmp_path), "-1"], cwd=REPO, env=env)
    assert done.returncode == 0
    frame = load_results(tmp_path)
    cells = expand_grid(parse_spec(small_spec()))
    assert sorted(frame["cell_id"]) == sorted(c.cell_id for c in cells)


def test_shard_stores_merge_keeping_the_best_row(tmp_path: Path) -> None:
    cells = expand_grid(parse_spec(small_spec(seeds=[0])))
    for i in range(2):
        run_sweep(shard(cells, i, 2), tmp_path / f"shard{i}", runner=fake_runner([]), progress=False)
    stale = ResultStore(tmp_path / "old")
    stale.write({**base_row(cells[0]), "status": "failed", "reason": "old", "finished_at": "9999"})
    frame = load_results(tmp_path)
    assert len(frame) == len(cells) and frame["cell_id"].is_unique
    assert frame.set_index("cell_id").loc[cells[0].cell_id, "status"] == "ok"


# ---- a real tiny sweep ---------------------------------------------------------------------------------------------


def test_tiny_sweep_trains_records_infeasible_and_reports(tmp_path: Path) -> None:
    raw = small_spec(
        methods=[{"name": "full", "budgets": [1]}, {"name": "hash", "budgets": [4]}, {"name": "mde", "budgets": [50]}],
        seeds=[0],
    )
    cells = expand_grid(parse_spec(raw))
    counts = run_sweep(cells, tmp_path, progress=False)
    assert (counts["ok"], counts["infeasible"], counts["failed"]) == (2, 1, 0)
    frame = load_results(tmp_path).set_index("method")
    assert frame.loc["hash", "ratio"] == pytest.approx(4, rel=0.05)
    assert 0.0 < frame.loc["hash", "test_auc"] < 1.0 and frame.loc["hash", "steps"] == 3
    assert frame.loc["full", "train_rows"] == 3000 and frame.loc["full", "train_step_ms"] > 0
    assert json.loads(frame.loc["hash", "resolved"])["rows"] > 0
    assert frame.loc["mde", "status"] == "infeasible" and "cannot fit" in frame.loc["mde", "reason"]
    report = build_report(tmp_path).read_text()
    assert "| hash |" in report and "infeasible" in report and "train 3,000" in report
    assert (tmp_path / "results.parquet").is_file() and list(tmp_path.glob("pareto_*.png"))
    again = run_sweep(cells, tmp_path, progress=False)
    assert again["skipped"] == 3 and again["ok"] == 0


# ---- report tables from a hand-made store --------------------------------------------------------------------------


def hand_store(tmp_path: Path) -> Path:
    """full at 1x; a and b at 4x and 16x (3 seeds); b infeasible at 16x; hand-picked metrics."""
    auc = {("a", 4): [0.70, 0.72, 0.74], ("b", 4): [0.75, 0.75, 0.78], ("a", 16): [0.60, 0.61, 0.62]}
    store = ResultStore(tmp_path)
    settings = json.dumps({"dataset": {"synthetic": {"seed": 0, "min_cardinality": 10, "max_cardinality": 99}}})
    common = {"dataset": "d", "model": "M", "train_rows": 1000, "val_rows": 10, "test_rows": 500, "batch_size": 64}
    common.update(eval_batch_size=128, sweep="s", versions=json.dumps({"torch": "9.9"}), settings=settings)
    for seed in range(3):
        store.write(
            {**common, "cell_id": f"full{seed}", "status": "ok", "method": "full", "method_label": "full"}
            | {"budget_ratio": 1.0, "seed": seed, "test_auc": 0.80, "test_logloss": 0.40, "ratio": 1.0}
            | {"memory_bytes": 1600, "train_step_ms": 10.0, "inference_ms": 4.0, "steps": 7}
        )
        for (method, budget), values in auc.items():
            store.write(
                {**common, "cell_id": f"{method}{budget}-{seed}", "status": "ok", "method": method}
                | {"method_label": method, "budget_ratio": float(budget), "seed": seed, "test_auc": values[seed]}
                | {"test_logloss": 1.0 - values[seed], "ratio": float(budget), "memory_bytes": 1600 // budget}
                | {"train_step_ms": 20.0 if method == "a" else 5.0, "inference_ms": 2.0, "steps": 7}
            )
        store.write(
            {**common, "cell_id": f"b16-{seed}", "status": "infeasible", "method": "b", "method_label": "b"}
            | {"budget_ratio": 16.0, "seed": seed, "reason": "b cannot fit 100 bytes"}
        )
    return tmp_path


def test_report_tables_match_hand_computed_values(tmp_path: Path) -> None:
    frame = load_results(hand_store(tmp_path))
    table = metric_table(frame, "test_auc", higher_is_better=True)
    assert list(table.columns) == ["1x", "4x", "16x"] and list(table.index) == ["full", "a", "b"]
    # a at 4x: mean 0.72, sample std 0.02; b at 4x: mean 0.76, std sqrt(((-.01)^2*2 + .02^2)/2) = 0.01732
    assert table.loc["a", "4x"] == "0.7200 ± 0.0200"
    assert table.loc["b", "4x"] == "**0.7600 ± 0.0173**"
    assert table.loc["a", "16x"] == "**0.6100 ± 0.0100**"
    assert table.loc["b", "16x"] == "infeasible"
    assert table.loc["full", "1x"] == "**0.8000 ± 0.0000**" and table.loc["full", "4x"] == ""
    logloss = metric_table(frame, "test_logloss", higher_is_better=False)
    assert logloss.loc["b", "4x"] == "**0.2400 ± 0.0173**" and logloss.loc["a", "4x"] == "0.2800 ± 0.0200"
    speed, caption = speed_tables(frame)
    assert speed.loc["a", "4x"] == "2.00x / 0.50x" and speed.loc["b", "4x"] == "0.50x / 0.50x"
    assert speed.loc["b", "16x"] == "—" and "10.0 ms per train step of 64 rows" in caption
    report = build_report(tmp_path).read_text()
    assert (
        "**0.7600 ± 0.0173**" in report
        and "1x: `full` (0.8000, best in 3/3 seeds); 4x: `b` (0.7600, best in 3/3 seeds)" in report
    )
    for fact in ("train 1,000", "test 500", "seeds: 0, 1, 2", "torch 9.9", "train steps run per cell: 7"):
        assert fact in report
    assert "`b` at 16x (infeasible, 3 cell(s)): b cannot fit 100 bytes" in report
    assert (tmp_path / "pareto_d_M.png").stat().st_size > 1000


def test_pareto_front() -> None:
    points = [(100, 0.8), (10, 0.75), (10, 0.70), (50, 0.74), (1, 0.6)]
    assert pareto_front(points) == [(1, 0.6), (10, 0.75), (100, 0.8)]


# ---- the command line ------------------------------------------------------------------------------------------------


def test_bench_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0 and "--shard" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["bench", "report", "--help"])
    assert done.value.code == 0


def test_bench_list_and_report_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps(small_spec()))  # JSON is YAML
    assert main(["bench", "--config", str(config), "--shard", "1/3", "--list"]) == 0
    out = capsys.readouterr().out
    total = len(expand_grid(parse_spec(small_spec())))
    assert f"of {total} cells (shard 1/3)" in out
    assert main(["bench", "report", "--output", str(tmp_path / "empty")]) == 2  # a user error: one line
    assert "error: No results under" in capsys.readouterr().err
    hand_store(tmp_path / "out")
    assert main(["bench", "report", "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").is_file()


def test_results_file_round_trips(tmp_path: Path) -> None:
    frame = load_results(hand_store(tmp_path))
    build_report(tmp_path)
    merged = pd.read_parquet(tmp_path / "results.parquet")
    assert len(merged) == len(frame) and set(merged["cell_id"]) == set(frame["cell_id"])
    assert len(load_results(tmp_path)) == len(frame)  # results.parquet and the cell files dedup to one row each


def test_method_versions_in_cell_ids_and_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_embed.benchmark.report import current_version_rows
    from recsys_embed.methods import method_class

    cells = expand_grid(parse_spec(small_spec(seeds=[0])))
    hashed = next(c for c in cells if c.method.name == "hash")
    assert hashed.settings()["method"]["version"] == 1
    before = hashed.cell_id
    monkeypatch.setattr(method_class("hash"), "version", 2)
    assert hashed.settings()["method"]["version"] == 2 and hashed.cell_id != before  # a bump reruns the cell
    rows = pd.DataFrame(
        {"method": ["hash", "hash", "full", "mine"], "method_version": [1, 2, None, 5], "status": ["ok"] * 4}
    )
    kept = current_version_rows(rows)  # hash v1 left out; unrecorded = v1; unregistered methods kept
    assert list(kept["method"]) == ["hash", "full", "mine"] and list(kept["method_version"].fillna(1)) == [2, 1, 5]

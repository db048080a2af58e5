"""Benchmark results that do not lie: what a cell id covers, what the report pools, what counts as done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import recsys_embed
from recsys_embed.benchmark import ResultStore, build_report, expand_grid, load_results, parse_spec, run_sweep
from recsys_embed.benchmark.runner import base_row
from recsys_embed.benchmark.spec import Cell
from recsys_embed.cli import main
from recsys_embed.models import DLRM
from tests.test_bench import fake_runner, small_spec


def auc_runner(auc: float) -> Any:
    """A runner that records ``ok`` with a fixed test AUC (no training)."""

    def run(cell: Cell, output: Path) -> dict[str, Any]:
        return {**base_row(cell), "status": "ok", "test_auc": auc, "memory_bytes": 10, "ratio": cell.budget}

    return run


def hash_only(**overrides: Any) -> dict[str, Any]:
    return small_spec(**{"methods": ["hash"], "budgets": [4], "seeds": [0, 1], **overrides})


def sections(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("## ")]


def test_an_edited_spec_rerun_into_the_same_output_is_reported_apart(tmp_path: Path) -> None:
    three = hash_only(training={"batch_size": 512, "max_epochs": 3, "limit_train_batches": 3, "csv_logs": False})
    two = hash_only(training={"batch_size": 512, "max_epochs": 2, "limit_train_batches": 3, "csv_logs": False})
    run_sweep(expand_grid(parse_spec(three)), tmp_path, runner=auc_runner(0.6), progress=False)
    run_sweep(expand_grid(parse_spec(two)), tmp_path, runner=auc_runner(0.8), progress=False)
    report = build_report(tmp_path).read_text()
    assert "0.7000" not in report  # the two settings are not averaged as if they were seeds
    assert sections(report) == [
        "## tiny / DLRM (training.max_epochs=3)",
        "## tiny / DLRM (training.max_epochs=2)",
    ]
    assert "| hash | **0.6000 ± 0.0000** |" in report and "| hash | **0.8000 ± 0.0000** |" in report
    assert report.count("seeds 0, 1; 2 ok seed(s) per entry") == 2  # each section says what it pooled


def prepared(folder: Path, content: str) -> Path:
    """A stand-in dataset folder (schema.json and a data file); the fake runner reads no data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "schema.json").write_text(json.dumps({"format": "recsys_embed.ctr/1", "note": content}))
    (folder / "train.parquet").write_bytes(content.encode() * 10)
    return folder


def test_two_data_dirs_under_one_dataset_name_are_two_groups(tmp_path: Path) -> None:
    for name, auc in (("a", 0.6), ("b", 0.8)):
        data = prepared(tmp_path / "data" / name, name)
        spec = parse_spec(hash_only(datasets=[{"name": "criteo", "data_dir": str(data)}]))
        run_sweep(expand_grid(spec), tmp_path / "out" / name, runner=auc_runner(auc), progress=False)
    report = build_report(tmp_path / "out").read_text()
    assert "0.7000" not in report
    titles = sections(report)
    assert len(titles) == 2 and all(t.startswith("## criteo / DLRM (dataset.data_dir=") for t in titles)
    assert "data/a" in titles[0] and "data/b" in titles[1]
    assert len(list((tmp_path / "out").glob("pareto_criteo_DLRM_*.png"))) == 2


def test_the_data_fingerprint_is_part_of_the_cell_id(tmp_path: Path) -> None:
    data = prepared(tmp_path / "d", "first")
    raw = hash_only(datasets=[{"name": "criteo", "data_dir": str(data)}])
    before = {c.cell_id for c in expand_grid(parse_spec(raw))}
    assert before == {c.cell_id for c in expand_grid(parse_spec(raw))}  # stable while the data is unchanged
    prepared(data, "other")  # the folder prepared again with other data
    assert not before & {c.cell_id for c in expand_grid(parse_spec(raw))}


def test_cell_ids_cover_defaults_and_the_package_version(monkeypatch: pytest.MonkeyPatch) -> None:
    cell = expand_grid(parse_spec(hash_only()))[0]
    identity = cell.settings()
    assert identity["model"]["options"] == {"bottom_mlp": [128, 64], "top_mlp": [256, 128]}
    assert identity["method"]["options"]["seed"] == 0 and identity["method"]["version"] == 1
    assert identity["training"]["optimizer"]["init_args"]["betas"] == [0.9, 0.999]
    assert identity["training"]["eval_batch_size"] == 512
    # giving a default explicitly is the same cell
    explicit = hash_only(methods=[{"name": "hash", "options": {"seed": 0}}], models=[{"name": "DLRM"}])
    assert expand_grid(parse_spec(explicit))[0].cell_id == cell.cell_id
    before = cell.cell_id
    defaults = dict(DLRM.__init__.__kwdefaults__)
    monkeypatch.setattr(DLRM.__init__, "__kwdefaults__", {**defaults, "bottom_mlp": (64, 32)})
    assert cell.cell_id != before  # a changed model default is another setting
    monkeypatch.setattr(DLRM.__init__, "__kwdefaults__", defaults)
    assert cell.cell_id == before
    monkeypatch.setattr(recsys_embed, "__version__", "99.0")
    assert cell.cell_id != before


def test_a_method_label_with_two_settings_is_split(tmp_path: Path) -> None:
    run_sweep(expand_grid(parse_spec(hash_only())), tmp_path, runner=auc_runner(0.6), progress=False)
    seeded = hash_only(methods=[{"name": "hash", "options": {"seed": 7}}])
    run_sweep(expand_grid(parse_spec(seeded)), tmp_path, runner=auc_runner(0.8), progress=False)
    report = build_report(tmp_path).read_text()
    assert len(sections(report)) == 1
    assert "| hash (options.seed=0) | 0.6000 ± 0.0000 |" in report
    assert "| hash (options.seed=7) | **0.8000 ± 0.0000** |" in report


def test_a_deleted_cell_file_is_not_done(tmp_path: Path) -> None:
    cells = expand_grid(parse_spec(hash_only()))
    run_sweep(cells, tmp_path, runner=fake_runner([]), progress=False)
    build_report(tmp_path)  # writes results.parquet with every row
    (tmp_path / "cells" / f"{cells[0].cell_id}.parquet").unlink()
    assert len(load_results(tmp_path)) == len(cells) - 1
    calls: list[str] = []
    assert run_sweep(cells, tmp_path, runner=fake_runner(calls), progress=False)["skipped"] == len(cells) - 1
    assert calls == [cells[0].cell_id]


def test_infeasible_cells_are_retried_when_the_solver_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys_embed.benchmark.identity as identity
    import recsys_embed.benchmark.runner as runner

    raw = small_spec(methods=[{"name": "mde", "budgets": [50]}], seeds=[0])
    cells = expand_grid(parse_spec(raw))
    assert run_sweep(cells, tmp_path, progress=False)["infeasible"] == 1
    row = load_results(tmp_path).iloc[0]
    assert row["solver"] == identity.solver_version("mde") and row["solver"].startswith("v1:")
    assert row["full_bytes"] > 0 and row["method_version"] == 1
    calls: list[str] = []
    assert run_sweep(cells, tmp_path, runner=fake_runner(calls), progress=False)["skipped"] == 1  # same solver
    monkeypatch.setattr(runner, "solver_version", lambda name: "v1:edited")  # the solver's source changed
    assert run_sweep(cells, tmp_path, runner=fake_runner(calls), progress=False)["ok"] == 1
    assert calls == [cells[0].cell_id]


def test_the_solver_version_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys_embed.benchmark.identity as identity

    source = tmp_path / "solver.py"
    monkeypatch.setattr(identity, "_source_files", lambda cls: [str(source)])
    source.write_text("def solve(): return 1\n")
    first = identity.solver_version("qr")
    source.write_text("def solve(): return 2\n")
    assert identity.solver_version("qr") != first


def test_a_missing_data_dir_fails_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "criteo_kaggle"
    raw = small_spec(datasets=[{"name": "criteo", "data_dir": str(missing)}])
    with pytest.raises(ValueError, match=r"data_dir '.*criteo_kaggle', which does not exist.*recsys-embed data criteo"):
        parse_spec(raw)
    missing.mkdir()
    with pytest.raises(ValueError, match=r"has no schema.json \(not a prepared dataset\)"):
        parse_spec(raw)
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps(raw))
    assert main(["bench", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Sweep spec: dataset 'criteo' has data_dir")
    assert not (tmp_path / "out").exists()  # no cell ran


def test_resolved_holds_the_solved_config(tmp_path: Path) -> None:
    raw = small_spec(methods=[{"name": "qr", "budgets": [4]}, {"name": "hash", "budgets": [4]}], seeds=[0])
    assert run_sweep(expand_grid(parse_spec(raw)), tmp_path, progress=False)["ok"] == 2
    frame = load_results(tmp_path).set_index("method")
    qr, hashed = (json.loads(frame.loc[m, "resolved"]) for m in ("qr", "hash"))
    assert isinstance(qr["collisions"], list) and len(qr["collisions"]) == 4  # the solved base of each table
    assert hashed["seed"] == 0 and hashed["hash"] == "splitmix64" and hashed["rows"] > 0


def test_older_result_folders_stay_readable_and_apart(tmp_path: Path) -> None:
    cells = expand_grid(parse_spec(hash_only()))
    run_sweep(cells, tmp_path, runner=auc_runner(0.6), progress=False)
    store = ResultStore(tmp_path)
    for cell in cells:  # rows as written before the identity format: settings without defaults or fingerprint
        settings = {k: v for k, v in cell.settings().items() if k not in ("format", "recsys_embed")}
        old = {**base_row(cell), "cell_id": f"old-{cell.seed}", "settings": json.dumps(settings)}
        store.write(old | {"status": "ok", "test_auc": 0.8, "memory_bytes": 10, "ratio": 4.0})
    report = build_report(tmp_path).read_text()
    assert "0.7000" not in report
    assert sections(report) == [
        '## tiny / DLRM (format=2, recsys_embed="0.1.0")',
        "## tiny / DLRM (older results: identity format < 2, settings not fully recorded; format=—, recsys_embed=—)",
    ]
    assert "settings not fully recorded: data fingerprint and defaults unknown): seeds 0, 1" in report


def test_a_folder_with_only_results_parquet_says_to_copy_the_cell_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_sweep(expand_grid(parse_spec(hash_only())), tmp_path, runner=auc_runner(0.6), progress=False)
    build_report(tmp_path)
    for path in (tmp_path / "cells").glob("*.parquet"):
        path.unlink()
    capsys.readouterr()  # only what the report command prints
    assert main(["bench", "report", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.parquet is the report's output, not read back: copy the cells/ folders" in err[0]

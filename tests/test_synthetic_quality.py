"""End-to-end (slow): on the default synthetic data, full tables reach clearly higher AUC than heavy hashing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from recsys_embed.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "ctr" / "synthetic_dlrm.yaml")


def _test_auc(run_dir: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> float:
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    main(["fit", "--config", CONFIG, "--test_after_fit=true", "--trainer.enable_progress_bar=false", *extra])
    rows = [
        row
        for path in run_dir.glob("runs/synthetic_dlrm/lightning_logs/*/metrics.csv")
        for row in csv.DictReader(path.open())
        if row.get("test/auc")
    ]
    assert len(rows) == 1
    return float(rows[0]["test/auc"])


@pytest.mark.slow
def test_full_beats_hash_at_100x_on_the_default_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full_auc = _test_auc(tmp_path / "full", monkeypatch)
    hash_auc = _test_auc(
        tmp_path / "hash", monkeypatch, "--model.embedding.method=hash", "--model.embedding.budget.ratio=100"
    )
    assert full_auc > 0.8
    assert full_auc - hash_auc > 0.01, (full_auc, hash_auc)

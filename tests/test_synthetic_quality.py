"""End-to-end (slow) quality checks on the default synthetic data: full tables clearly beat heavy hashing, QR beats
hashing at equal memory, 8-bit rows (quant, alpt) about as good as full."""

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


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [4, 16])
def test_qr_beats_hash_at_equal_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ratio: int) -> None:
    """Shi et al. (KDD'20): compositional embeddings beat the hashing trick at equal memory. On this data that holds
    for QR with ``concat`` at 4x and 16x (5/5 seeds each in ``experiments/sweeps/qr_vs_hash.yaml``); ``mult`` wins
    at 4x only. Mean test AUC over three seeds."""

    def mean_auc(method: str, *options: str) -> float:
        aucs = [
            _test_auc(
                tmp_path / f"{method}-{seed}",
                monkeypatch,
                f"--model.embedding.method={method}",
                f"--model.embedding.budget.ratio={ratio}",
                f"--seed_everything={seed}",
                f"--data.seed={seed}",
                *options,
            )
            for seed in range(3)
        ]
        return sum(aucs) / len(aucs)

    qr_auc = mean_auc("qr", "--model.embedding.options={operation: concat}")
    hash_auc = mean_auc("hash")
    assert qr_auc > hash_auc, (qr_auc, hash_auc)


@pytest.mark.slow
def test_8_bit_rows_train_about_as_well_as_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ALPT's claim (Li et al., AAAI'23): 8-bit embeddings lose no accuracy against fp32. On the default data (seed
    0) ``quant`` at 4x and ``alpt`` at 3.2x (both 8 bits) reach ``full``'s test AUC to within 0.003."""
    full_auc = _test_auc(tmp_path / "full", monkeypatch)
    for method, ratio in (("quant", 4), ("alpt", 3)):
        options = [f"--model.embedding.method={method}", f"--model.embedding.budget.ratio={ratio}"]
        auc = _test_auc(tmp_path / method, monkeypatch, *options)
        assert auc > full_auc - 0.003, (method, auc, full_auc)

"""``recsys-embed fit/test`` on a graph config (``task: graph``): the shipped YAML runs, resumes and tests."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from recsys_embed.cli import main
from recsys_embed.graph_cli import task_kind
from tests.test_graph_task import random_graph

GRAPH_CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "graph"
CONFIG = str(GRAPH_CONFIGS / "ml100k_lightgcn.yaml")


def tiny_args(tmp_path: Path) -> list[str]:
    random_graph(0, users=60, items=80, pairs=900).save(tmp_path / "graph")
    return [
        "--config",
        CONFIG,
        f"--data.data_dir={tmp_path / 'graph'}",
        "--data.batch_size=128",
        "--model.embedding_dim=8",
        "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
    ]


def test_task_kind_reads_the_yaml_or_the_option(tmp_path: Path) -> None:
    assert task_kind(["fit", "--config", CONFIG]) == "graph"
    assert task_kind(["fit", f"--config={CONFIG}", "--task", "ctr"]) == "ctr"
    ctr = GRAPH_CONFIGS.parents[0] / "ctr" / "synthetic_dlrm.yaml"
    assert task_kind(["fit", "--config", str(ctr)]) == "ctr"
    assert task_kind(["fit", "--task=graph"]) == "graph"


def test_every_shipped_graph_config_parses(capsys: pytest.CaptureFixture[str]) -> None:
    configs = sorted(GRAPH_CONFIGS.glob("*.yaml"))
    assert len(configs) >= 5
    for config in configs:
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", str(config), "--print_config"])
        assert done.value.code == 0, config
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["task"] == "graph" and "num_users" not in printed["model"]  # linked from the data


def test_fit_then_resume_and_test_from_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = tiny_args(tmp_path)
    main(["fit", *args, "--test_after_fit=true"])
    run = tmp_path / "runs" / "ml100k_lightgcn" / "lightning_logs" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert {"train/bpr", "val/recall@20", "val/ndcg@20", "test/recall@20"} <= set(rows[0])
    last = run / "checkpoints" / "last.ckpt"
    main(["fit", *args, "--trainer.max_epochs=3", f"--ckpt_path={last}"])
    saved_epoch = torch.load(last, weights_only=False)["epoch"]  # last.ckpt follows the best val/recall@20
    resumed = list(csv.DictReader((run.parent / "version_1" / "metrics.csv").open()))
    assert min(int(r["epoch"]) for r in resumed) == saved_epoch + 1  # the epochs before came from the checkpoint
    assert max(int(r["epoch"]) for r in resumed) == 2
    assert main(["test", *args, f"--ckpt_path={last}"]) is None


def test_graph_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = tiny_args(tmp_path)
    assert main(["fit", *args, "--model.embedding.method=pep", "--model.embedding.budget.ratio=2"]) == 2
    assert "graph CLI trains single-stage methods only" in capsys.readouterr().err
    assert main(["fit", "--config", CONFIG, f"--data.data_dir={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a graph dataset folder" in err and err.count("\n") == 1

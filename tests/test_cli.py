"""The ``recsys-embed`` CLI from the shipped YAML config: print_config, a few training steps, test from a checkpoint."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

from recsys_embed.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "ctr" / "synthetic_dlrm.yaml")
TINY = [
    "--data.synthetic.train_rows=3000",
    "--data.synthetic.val_rows=1000",
    "--data.synthetic.test_rows=1000",
    "--data.synthetic.num_sparse=4",
    "--data.synthetic.max_cardinality=1000",
    "--data.batch_size=256",
    "--data.eval_batch_size=1000",
    "--trainer.enable_progress_bar=false",
]


def test_print_config_shows_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", CONFIG, "--print_config"])
    assert done.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["embedding"]["method"] == "full"
    assert config["model"]["model"]["class_path"] == "recsys_embed.models.DLRM"
    assert config["model"]["sparse_optimizer"]["name"] == "rowwise_adagrad"
    assert "cardinalities" not in config["model"]  # linked from the data, never repeated in a config


def test_fit_a_few_steps_then_test_from_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", CONFIG, *TINY, "--trainer.log_every_n_steps=2", "--test_after_fit=true"])
    checkpoints = sorted(tmp_path.glob("runs/synthetic_dlrm/**/checkpoints/last.ckpt"))
    assert len(checkpoints) == 1
    metrics = sorted(tmp_path.glob("runs/synthetic_dlrm/lightning_logs/*/metrics.csv"))
    header = metrics[0].read_text().splitlines()[0]
    assert "train/loss" in header and "val/auc" in header and "test/auc" in header
    assert list(tmp_path.glob("runs/synthetic_dlrm/lightning_logs/*/events.out.tfevents.*"))
    main(["test", "--config", CONFIG, *TINY, f"--ckpt_path={checkpoints[0]}"])
    main(["validate", "--config", CONFIG, *TINY, f"--ckpt_path={checkpoints[0]}"])


def test_one_fit_is_one_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CSV metrics, TensorBoard events, config.yaml and checkpoints of a fit share one version folder; the next
    fit gets the next one."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        main(["fit", "--config", CONFIG, *TINY, "--trainer.max_steps=2", "--trainer.log_every_n_steps=1"])
    runs = sorted(p.name for p in (tmp_path / "runs" / "synthetic_dlrm" / "lightning_logs").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        folder = tmp_path / "runs" / "synthetic_dlrm" / "lightning_logs" / run
        assert (folder / "metrics.csv").is_file() and (folder / "config.yaml").is_file()
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "synthetic_dlrm").iterdir()) == ["lightning_logs"]


def test_a_staged_fit_logs_every_stage_to_one_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import staged_toy

    monkeypatch.chdir(tmp_path)
    with staged_toy.registered():
        main(["fit", "--config", CONFIG, *TINY, f"--model.embedding.method={staged_toy.NAME}"])
    (folder,) = (tmp_path / "runs" / "synthetic_dlrm" / "lightning_logs").iterdir()
    header = (folder / "metrics.csv").read_text().splitlines()[0]
    assert "stage_time_s/warmup" in header and "stage_time_s/frozen" in header
    assert (folder / "config.yaml").is_file() and list(folder.glob("events.out.tfevents.*"))
    stages = tmp_path / "runs" / "synthetic_dlrm" / "stages"  # the resume points: one folder for every rerun
    assert (stages / "warmup" / "final.ckpt").is_file() and (stages / "frozen" / "final.ckpt").is_file()


def test_fit_with_a_compressed_method_and_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--model.embedding.method=hash", "--model.embedding.budget.ratio=20", "--trainer.max_steps=2"]
    main(["fit", "--config", CONFIG, *TINY, *args])
    hparams = next(tmp_path.glob("runs/synthetic_dlrm/lightning_logs/*/hparams.yaml"))
    logged = yaml.safe_load(hparams.read_text())
    assert logged["embedding/ratio"] == pytest.approx(20, rel=0.1)


def test_unknown_method_fails_with_the_registry_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", CONFIG, *TINY, "--model.embedding.method=nope"]) == 2
    assert "error: Unknown embedding method 'nope'; registered methods: [" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown embedding method 'nope'"):  # --debug: the exception itself
        main(["fit", "--config", CONFIG, *TINY, "--model.embedding.method=nope", "--debug"])


def test_unknown_option_fails_listing_valid_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--model.embedding.method=hash", "--model.embedding.options={rowz: 3}"]
    assert main(["fit", "--config", CONFIG, *TINY, *args]) == 2
    assert "no option(s) ['rowz']" in capsys.readouterr().err


def test_fit_a_frequency_aware_method_reads_the_data_id_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--model.embedding.method=adapt", "--model.embedding.budget.ratio=8", "--trainer.max_steps=2"]
    main(["fit", "--config", CONFIG, *TINY, *args])
    assert list(tmp_path.glob("runs/synthetic_dlrm/**/checkpoints/last.ckpt"))


def test_frequency_aware_method_without_counts_is_a_clear_error() -> None:
    from recsys_embed.training import CTRTask, EmbeddingSpec

    with pytest.raises(ValueError, match="needs the data's id counts"):
        CTRTask({"cat_0": 100}, 0, embedding=EmbeddingSpec(method="adapt", options={"rows": 10}))


def test_each_epoch_gets_its_own_shuffle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_embed.data import CTRDataModule
    from recsys_embed.training import CTRTask

    monkeypatch.chdir(tmp_path)
    first_ids: list[list[int]] = []

    class Recording(CTRTask):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN202
            if batch_idx == 0:
                first_ids.append(batch.sparse_features.values()[:50].tolist())
            return super().training_step(batch, batch_idx)

    import lightning.pytorch as pl

    from tests.conftest import TINY_SYNTHETIC

    dm = CTRDataModule(synthetic=TINY_SYNTHETIC, batch_size=2000)
    trainer = pl.Trainer(
        max_epochs=2,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(Recording(dm.cardinalities, dm.num_dense), datamodule=dm)
    assert len(first_ids) == 2 and first_ids[0] != first_ids[1]


def test_methods_command_lists_every_method_with_options_and_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    from recsys_embed.cli import main

    assert main(["methods", "hash", "qr"]) == 0
    out = capsys.readouterr().out
    assert "hash (version 1): the hashing trick" in out and "rows: int (required unless a budget is given" in out
    assert "qr (version 1)" in out and "reachable ratios: 1.23x - " in out and "operation: Literal" in out
    assert main(["methods", "hsah"]) == 2
    assert "error: unknown method(s) ['hsah']" in capsys.readouterr().err


def help_entries(text: str, start: str) -> dict[str, str]:
    """The entries of a ``--help`` block that starts after the line ``start``: the first word of each entry
    (a command or an option), its description with the wrapped lines joined."""
    lines = text.split(start, 1)[1].splitlines()
    entries: dict[str, str] = {}
    name = None
    for line in lines:
        head = re.match(r"^  +(-{0,2}[\w.]+)(?: [A-Z_]+)?(?:  +(.*))?$", line)
        if head and len(line) - len(line.lstrip()) <= 4:  # an entry starts (help text deeper, from column ~24)
            name = head.group(1)
            entries[name] = head.group(2) or ""
        elif name is not None and line.strip():
            entries[name] = f"{entries[name]} {line.strip()}".strip()
        elif name is not None:
            name = None  # a blank line ends the block's entries
    return entries


def test_top_level_help_lists_every_command_with_a_whole_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    commands = help_entries(out, "Available subcommands:")
    commands.pop("(required)", None)
    assert list(commands) == ["fit", "validate", "test", "predict", "bench", "methods", "data"]
    for name, sentence in commands.items():
        assert sentence[:1].isupper() and sentence.endswith("."), (name, sentence)
    assert "Runs the full optimization routine" not in out and "It's separated from fit" not in out  # Lightning's
    assert "{fit,validate,test,predict,bench,methods,data}" in out


def test_fit_help_lists_the_registered_methods(capsys: pytest.CaptureFixture[str]) -> None:
    from recsys_embed.methods import available_methods
    from tests import staged_toy

    with staged_toy.registered(), pytest.raises(SystemExit):  # a method registered by a plugin is listed too
        main(["fit", "--help"])
    options = help_entries(capsys.readouterr().out, "the compression method")
    method = options["--model.embedding.method"]
    listed = re.search(r"one of: ([\w, ]+) \(", method)
    assert listed and listed.group(1).split(", ") == sorted([*available_methods(), staged_toy.NAME])
    assert "recsys-embed methods NAME" in method.replace("recsys- embed", "recsys-embed")  # argparse wraps at hyphens
    assert "budget.ratio" in options["--model.embedding.budget"] and "options" in options["--model.embedding.options"]


@pytest.mark.slow
def test_the_criteo_config_trains_on_the_10k_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shipped Criteo settings are for the 10k-row sample: many steps, validations, a test AUC near the
    README's (DLRM 0.741 with seed 0; 0.617 after 2 steps at batch 4096 before)."""
    from data_scripts.criteo import main as criteo_script
    from tests.conftest import SHARED_DATA

    sample = SHARED_DATA / "criteo_sample" / "train.txt"
    if not sample.is_file():
        pytest.skip(f"real Criteo rows not found at {sample} (shared data folder absent)")
    criteo_script(["--input", str(sample), "--output", str(tmp_path / "data" / "criteo_sample")])
    monkeypatch.chdir(tmp_path)
    config = str(Path(CONFIG).with_name("criteo_dlrm.yaml"))
    assert main(["fit", "--config", config, "--test_after_fit=true", "--trainer.enable_progress_bar=false"]) is None
    (metrics,) = tmp_path.glob("runs/criteo_dlrm/lightning_logs/*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    validations = [int(row["step"]) for row in rows if row.get("val/auc")]
    assert len(validations) >= 4 and validations[-1] >= 60  # 33 steps an epoch, early stopping after > 1 epoch
    (test_auc,) = [float(row["test/auc"]) for row in rows if row.get("test/auc")]
    assert test_auc > 0.72

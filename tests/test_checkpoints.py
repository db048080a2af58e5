"""Self-described CTRTask checkpoints: every model reloads with ``load_from_checkpoint`` (no budget solve, no id
counts read) and through ``recsys-embed test --ckpt_path``; mismatched tables or method versions are clear errors."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from recsys_embed.cli import main
from recsys_embed.data import CTRDataModule
from recsys_embed.methods import Budget, method_class
from recsys_embed.models import DCN, DLRM, DCNv2, DeepFM, WideDeep
from recsys_embed.training import CTRTask, EmbeddingSpec
from recsys_embed.training.task_config import checkpoint_description
from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]
#: model class, its (small) options, the method it is checked with
CASES: dict[str, tuple[type, dict[str, Any], EmbeddingSpec]] = {
    "DLRM": (DLRM, {"bottom_mlp": [8], "top_mlp": [8]}, EmbeddingSpec("adapt", Budget(ratio=4))),
    "DeepFM": (DeepFM, {"deep_mlp": [8]}, EmbeddingSpec("hash", Budget(ratio=4))),
    "WideDeep": (WideDeep, {"deep_mlp": [8], "dropout": 0.1}, EmbeddingSpec("full")),
    "DCN": (DCN, {"deep_mlp": [8], "num_cross_layers": 2}, EmbeddingSpec("qr", Budget(ratio=4))),
    "DCNv2": (DCNv2, {"deep_mlp": [8], "low_rank": 4}, EmbeddingSpec("hash", options={"rows": 64})),
}


def trained(name: str, data: CTRDataModule, folder: Path) -> tuple[CTRTask, Path]:
    """A task of model ``name`` trained for 2 steps, and its checkpoint."""
    cls, options, spec = CASES[name]
    pl.seed_everything(0)
    task = CTRTask(
        data.cardinalities,
        data.num_dense,
        8,
        spec,
        model=functools.partial(cls, **options),
        id_counts_dir=str(data.data_dir),
    )
    trainer = pl.Trainer(
        max_steps=2,
        limit_val_batches=0,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=data)
    path = folder / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return task, path


@pytest.fixture(scope="module")
def data(tiny_dataset: Path) -> CTRDataModule:
    return CTRDataModule(data_dir=str(tiny_dataset), batch_size=500, eval_batch_size=300)


@pytest.fixture(scope="module")
def checkpoints(data: CTRDataModule, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[CTRTask, Path]]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {name: trained(name, data, folder) for name in CASES}


def no_solving_no_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a budget solve or an id-counts read fail loudly."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a reload must not solve a budget or read id counts")

    monkeypatch.setattr("recsys_embed.training.ctr_task.load_id_counts", refuse)
    for name in ("adapt", "hash", "qr"):
        monkeypatch.setattr(method_class(name), "from_budget", classmethod(refuse))


@pytest.mark.parametrize("name", list(CASES))
def test_every_model_reloads_with_the_same_predictions(
    name: str, checkpoints: dict[str, tuple[CTRTask, Path]], data: CTRDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, path = checkpoints[name]
    saved = torch.load(path, weights_only=True)  # plain types only
    description = saved["hyper_parameters"]["description"]
    assert description["model"]["class"].endswith(f".{CASES[name][0].__name__}")
    assert description["model"]["init_args"] == CASES[name][1]
    assert description["method"]["name"] == CASES[name][2].method
    assert description["method"]["version"] == method_class(CASES[name][2].method).version
    assert description["method"]["stage"] == "train" and description["method"]["tables"]
    assert checkpoint_description(path) == description
    no_solving_no_counts(monkeypatch)
    loaded = CTRTask.load_from_checkpoint(path)
    assert type(loaded.net) is CASES[name][0]
    batch = next(iter(data.val_dataloader()))
    task.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), task(batch))


def test_tables_that_differ_from_the_checkpoint_are_a_clear_error(
    checkpoints: dict[str, tuple[CTRTask, Path]],
) -> None:
    _, path = checkpoints["DeepFM"]
    with pytest.raises(ValueError, match=r"built for other tables .*embedding_dim"):
        CTRTask.load_from_checkpoint(path, embedding_dim=16)
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    other = {**hparams["cardinalities"], "cat_0": 7}
    with pytest.raises(ValueError, match=r"table 't_cat_0': the checkpoint has .* expected"):
        CTRTask.load_from_checkpoint(path, cardinalities=other)


def test_another_method_version_is_a_clear_error(
    checkpoints: dict[str, tuple[CTRTask, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = checkpoints["DeepFM"]
    monkeypatch.setattr(method_class("hash"), "version", 99)
    with pytest.raises(ValueError, match="is version 1, this code has version 99"):
        CTRTask.load_from_checkpoint(path)


def test_loading_into_a_task_of_another_method_is_a_clear_error(
    checkpoints: dict[str, tuple[CTRTask, Path]], data: CTRDataModule
) -> None:
    _, path = checkpoints["DeepFM"]
    other = CTRTask(data.cardinalities, data.num_dense, 8, EmbeddingSpec("hash", options={"rows": 32}), model=DeepFM)
    trainer = pl.Trainer(inference_mode=False, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"written by method .*'rows': 32.*load_from_checkpoint"):
        trainer.validate(other, datamodule=data, ckpt_path=path)


def test_cli_tests_a_deepfm_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "experiments" / "ctr" / "synthetic_deepfm.yaml")
    method = ["--model.embedding.method=adapt", "--model.embedding.budget.ratio=8"]
    main(["fit", "--config", config, *TINY, *method, "--trainer.max_steps=3"])
    (ckpt,) = tmp_path.glob("runs/synthetic_deepfm/**/checkpoints/last.ckpt")
    no_solving_no_counts(monkeypatch)
    main(["test", "--config", config, *TINY, *method, f"--ckpt_path={ckpt}"])
    other_data = "--data.synthetic.max_cardinality=500"
    assert main(["test", "--config", config, *TINY, *method, other_data, f"--ckpt_path={ckpt}"]) == 2
    assert "built for other tables" in capsys.readouterr().err


def predict(checkpoint: Path, data: CTRDataModule, output: Path, *extra: str) -> Any:
    """``recsys-embed predict`` on ``checkpoint`` (no config: the checkpoint describes the model), as a frame."""
    import pandas as pd

    args = ["predict", f"--data.data_dir={data.data_dir}", "--data.eval_batch_size=300", f"--ckpt_path={checkpoint}"]
    quiet = ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={output.parent}"]  # logs beside it
    assert main([*args, *quiet, f"--predict_output={output}", *extra]) is None
    return pd.read_parquet(output)


def own_scores(task: CTRTask, batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's own sigmoid(forward) and the labels over ``batches``."""
    task.eval()
    with torch.no_grad():
        pairs = [(torch.sigmoid(task(batch)), batch.labels) for batch in batches]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


@pytest.mark.parametrize("name", list(CASES))
def test_predict_writes_every_test_row_with_the_models_scores(
    name: str, checkpoints: dict[str, tuple[CTRTask, Path]], data: CTRDataModule, tmp_path: Path
) -> None:
    task, path = checkpoints[name]
    frame = predict(path, data, tmp_path / "test.parquet")
    assert list(frame.columns) == ["row", "label", "score"]
    assert frame["row"].tolist() == list(range(data.schema.rows["test"]))
    scores, labels = own_scores(task, data.test_dataloader())
    torch.testing.assert_close(torch.tensor(frame["score"].to_numpy()), scores, rtol=1e-5, atol=1e-6)
    assert frame["label"].tolist() == labels.long().tolist()


def test_predict_a_named_split_or_a_given_file(
    checkpoints: dict[str, tuple[CTRTask, Path]], data: CTRDataModule, tmp_path: Path, caplog: Any
) -> None:
    import pyarrow.parquet as pq

    task, path = checkpoints["DCN"]
    frame = predict(path, data, tmp_path / "val.parquet", "--predict_split=val")
    scores, _ = own_scores(task, data.val_dataloader())
    assert len(frame) == data.schema.rows["val"]
    torch.testing.assert_close(torch.tensor(frame["score"].to_numpy()), scores, rtol=1e-5, atol=1e-6)
    unlabelled = tmp_path / "unlabelled.parquet"  # the val rows without their label column
    pq.write_table(pq.read_table(data.schema.split_path(data.data_dir, "val")).drop(["label"]), unlabelled)
    given = predict(path, data, tmp_path / "given.parquet", f"--predict_file={unlabelled}")
    assert list(given.columns) == ["row", "score"]
    assert given["score"].tolist() == frame["score"].tolist()

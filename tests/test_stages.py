"""Staged methods: ``recsys-embed fit`` runs every stage (regularizer in the loss, per-step hook, own parameter
groups, next stage's form), resumes a killed run, ``--stage`` restarts at a stage; the benchmark runs every stage.

The two-stage method is the test-only :mod:`tests.staged_toy`, registered only inside the ``toy`` fixture.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from recsys_embed.benchmark import expand_grid, load_results, parse_spec, run_sweep
from recsys_embed.cli import main
from recsys_embed.methods import available_methods
from tests import staged_toy
from tests.test_bench import small_spec
from tests.test_cli import TINY

STEPS = 11  # 3000 train rows / batch 256, last batch dropped


def config(folder: Path) -> str:
    """A small staged run: checkpoints every 3 steps (resume points), CSV logs, DLRM over the toy method."""
    raw = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "default_root_dir": str(folder / "run"),
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "every_n_train_steps": 3},
                }
            ],
        },
        "model": {
            "embedding_dim": 8,
            "embedding": {"method": staged_toy.NAME},
            "model": {"class_path": "recsys_embed.models.DLRM", "init_args": {"bottom_mlp": [8], "top_mlp": [8]}},
            "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
        },
    }
    path = folder / "staged.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def toy() -> Iterator[type]:
    with staged_toy.registered() as cls:
        yield cls
    assert staged_toy.NAME not in available_methods()


def fit(folder: Path, *extra: str) -> int | None:
    return main(["fit", "--config", config(folder), *TINY, "--data.eval_batch_size=1000", *extra])


def user_error(capsys: pytest.CaptureFixture[str], folder: Path, *extra: str) -> str:
    """A fit that must stop with the CLI's one error line (exit code 2); that line."""
    capsys.readouterr()
    assert fit(folder, *extra) == 2
    return capsys.readouterr().err


def state(folder: Path) -> dict:
    return json.loads((folder / "run" / "stages" / "state.json").read_text())


def final(folder: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / "run" / "stages" / stage / "final.ckpt", weights_only=True)["state_dict"]


def test_the_toy_is_registered_only_inside_the_fixture(toy: type) -> None:
    assert staged_toy.NAME in available_methods()


def test_fit_runs_both_stages(toy: type, tmp_path: Path) -> None:
    fit(tmp_path)
    run = state(tmp_path)
    assert run["order"] == ["warmup", "frozen"]
    for name in run["order"]:
        assert run["stages"][name]["status"] == "done" and run["stages"][name]["steps"] == STEPS
        assert run["stages"][name]["time_s"] > 0
    # the hook ran after every optimizer step of each stage, steps counted within the stage
    assert staged_toy.HOOK_CALLS == [("warmup", s) for s in range(STEPS)] + [("frozen", s) for s in range(STEPS)]
    warm, frozen = final(tmp_path, "warmup"), final(tmp_path, "frozen")
    assert int(warm["net.embedding.hook_calls"]) == STEPS and int(frozen["net.embedding.hook_calls"]) == 2 * STEPS
    scale = warm["net.embedding.scale"]
    assert not torch.allclose(scale, torch.ones_like(scale))  # its own optimizer trained it
    torch.testing.assert_close(frozen["net.embedding.scale"], scale)  # then frozen into the next form
    key = "net.embedding.tables.embedding_bags.t_cat_0.weight"
    assert not torch.equal(frozen[key], warm[key])  # the rows trained on in stage 2
    (metrics_file,) = tmp_path.glob("lightning_logs/*/metrics.csv")
    metrics = pd.read_csv(metrics_file)
    logged = metrics.dropna(subset=["train/regularizer"])
    assert len(logged) == STEPS and (logged["train/regularizer"].iloc[1:] > 0).all()  # warmup only (scale starts at 1)
    torch.testing.assert_close(
        torch.tensor(logged["train/loss"].to_numpy()),
        torch.tensor((logged["train/bce"] + logged["train/regularizer"]).to_numpy()),
    )
    assert metrics["stage_time_s/warmup"].notna().any() and metrics["stage_time_s/frozen"].notna().any()
    # the final checkpoint reloads in its stage's form through the CLI
    ckpt = tmp_path / "run" / "stages" / "frozen" / "final.ckpt"
    main(["test", "--config", config(tmp_path), *TINY, "--data.eval_batch_size=1000", f"--ckpt_path={ckpt}"])


def test_a_killed_run_resumes_at_its_stage_and_step(toy: type, tmp_path: Path) -> None:
    staged_toy.KILL_AT.append(("frozen", 7))
    with pytest.raises(staged_toy.SimulatedKill):
        fit(tmp_path)
    killed = state(tmp_path)
    assert killed["stages"]["warmup"]["status"] == "done" and killed["stages"]["frozen"]["status"] == "running"
    staged_toy.KILL_AT.clear()
    staged_toy.HOOK_CALLS.clear()
    fit(tmp_path)  # the same command again
    # warmup skipped; frozen resumed from its last checkpoint (step 6), not from its start
    assert staged_toy.HOOK_CALLS == [("frozen", s) for s in range(6, STEPS)]
    resumed = state(tmp_path)
    assert resumed["stages"]["warmup"] == killed["stages"]["warmup"]
    assert resumed["stages"]["frozen"]["status"] == "done" and resumed["stages"]["frozen"]["steps"] == STEPS
    assert int(final(tmp_path, "frozen")["net.embedding.hook_calls"]) == 2 * STEPS
    staged_toy.HOOK_CALLS.clear()
    fit(tmp_path, "--test_after_fit=true")  # everything done: nothing trains, the final form is tested
    assert staged_toy.HOOK_CALLS == []
    assert any("test/auc" in p.read_text() for p in tmp_path.glob("lightning_logs/*/metrics.csv"))


def test_stage_option_restarts_at_a_stage(toy: type, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert re.search(r"error: .*stage\(s\) \['warmup'\] are not done", user_error(capsys, tmp_path, "--stage=frozen"))
    assert "'nope' is not a stage of method 'staged_toy'" in user_error(capsys, tmp_path, "--stage=nope")
    fit(tmp_path)
    first = state(tmp_path)
    staged_toy.HOOK_CALLS.clear()
    fit(tmp_path, "--stage=frozen")
    assert staged_toy.HOOK_CALLS == [("frozen", s) for s in range(STEPS)]
    again = state(tmp_path)
    assert again["stages"]["warmup"] == first["stages"]["warmup"] and again["stages"]["frozen"]["status"] == "done"
    assert "holds the stages of another run" in user_error(capsys, tmp_path, "--model.embedding.options={l2: 0.1}")


def test_the_benchmark_runs_every_stage(toy: type, tmp_path: Path) -> None:
    raw = small_spec(methods=[{"name": staged_toy.NAME, "budgets": [1]}, {"name": "full", "budgets": [1]}], seeds=[0])
    cells = expand_grid(parse_spec(raw))
    toy_cell = next(c for c in cells if c.method.name == staged_toy.NAME)
    assert toy_cell.settings()["method"]["version"] == staged_toy.StagedToy.version  # version 3: in the cell id
    assert run_sweep(cells, tmp_path, progress=False)["ok"] == 2
    frame = load_results(tmp_path).set_index("method")
    staged, full = frame.loc[staged_toy.NAME], frame.loc["full"]
    times = json.loads(staged["stage_times"])
    assert set(times["stages"]) == {"warmup", "frozen"} and all(t > 0 for t in times["stages"].values())
    assert staged["steps"] == 6  # 3 per stage
    assert staged["method_version"] == staged_toy.StagedToy.version and full["method_version"] == 1
    assert staged["training_bytes"] > staged["memory_bytes"]  # the hook counter is training-only state
    assert full["training_bytes"] == full["memory_bytes"]
    assert set(json.loads(full["stage_times"])["stages"]) == {"train"}


def test_served_form_of_each_stage_drops_training_state_and_keeps_the_outputs(toy: type) -> None:
    """The contract test's served-form check, on the staged toy: its hook counter is training state only."""
    from tests.conftest import make_tables, random_kjt

    tables = make_tables()
    warm = toy(tables)
    frozen = warm.next_stage()
    kjt = random_kjt(tables, batch=5)
    for form in (warm, frozen):
        served = form.to_serving()
        assert not hasattr(served, "hook_calls")
        assert sum(t.numel() * t.element_size() for t in served.state_dict().values()) == form.memory_bytes()
        torch.testing.assert_close(served(kjt).values(), form(kjt).values())


def test_a_default_served_form_that_does_not_match_memory_bytes_is_a_clear_error(toy: type) -> None:
    from tests.conftest import make_tables

    class Leaky(toy):  # type: ignore[misc, valid-type]
        training_state = ()  # forgets that hook_calls is training-only

    with pytest.raises(ValueError, match=r"served form stores \d+ bytes but memory_bytes\(\) says \d+"):
        Leaky(make_tables()).to_serving()

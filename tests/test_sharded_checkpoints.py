"""Checkpoints of sharded runs move between 1 and 2 processes exactly, for every CPU sharding type.

One 2-process run of ``tests/checkpoint_worker.py`` covers table-wise, column-wise and table-column-wise sharding
(column shards 4 wide, so the dim-8 tables split in two) of several methods: the one-process state loaded into
shards, the sharded state exported and loaded on one process (here) and into fresh shards, weights and fused
optimizer state (row-wise Adagrad accumulators, element-wise Adagrad for the mixed model's unpooled tables).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from recsys_embed.data import CTRDataModule
from recsys_embed.methods.fused import FusedTables, fuse_tables
from recsys_embed.training import CTRTask
from recsys_embed.training.planning import _column_constraints
from recsys_embed.training.sharded_state import load_fused_optimizer_state
from tests.checkpoint_worker import LIGHTNING_STEPS, OPTIMIZER, TABLES, build, cases
from tests.conftest import make_tables, random_kjt
from tests.test_sharding import launch

WORKER = Path(__file__).with_name("checkpoint_worker.py")
CASES = [f"{sharding}.{model}" for sharding, model in cases()]


@pytest.fixture(scope="module")
def saved(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded_checkpoints")
    for rank, result in enumerate(launch(2, str(tiny_dataset), str(out), worker=WORKER)):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-4000:]}"
    return out


def load_case(saved: Path, case: str) -> dict[str, Any]:
    return torch.load(saved / f"{case}.pt", weights_only=False)


def one_process(model: str) -> torch.nn.Module:
    net = build(model, make_tables(TABLES))
    fuse_tables(net, OPTIMIZER)
    return net


def fused_state(net: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: m.optimizer_state() for name, m in net.named_modules() if isinstance(m, FusedTables)}


def assert_equal_states(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Same entries, exactly the same values (tensors, or dicts of them)."""
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_equal_states(got[key], value)
        else:
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.parametrize("case", CASES)
def test_the_export_of_a_sharded_run_has_the_layout_of_one_process(saved: Path, case: str) -> None:
    """The bug: column-split row-wise state came out as [rows * 2] (e.g. [200] for a 100-row table)."""
    sharding, model = case.split(".")
    result = load_case(saved, case)
    assert set(result["plan"].values()) == {sharding}, result["plan"]
    one, two = result["one"]["optimizer"], result["two"]["optimizer"]
    assert set(two) == set(one)
    for path, states in one.items():
        assert {k: v.shape for k, v in two[path].items()} == {k: v.shape for k, v in states.items()}, path
    rowwise = {(p, k) for p, states in two.items() for k, v in states.items() if v.dim() == 1}
    assert rowwise  # every model has row-wise Adagrad tables
    columns = result["two"]["column_shards"]
    split = {(p, k) for p, states in columns.items() for k in states}
    assert split == (rowwise if sharding != "table_wise" else set())
    for path, key in split:  # each column shard's own accumulator (they differ); the export holds their mean
        values = columns[path][key]["values"]
        assert columns[path][key]["column_offsets"].tolist() == [0, 4, 8] and not torch.equal(values[0], values[1])
        torch.testing.assert_close(two[path][key], values.double().mean(0).float(), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_state_saved_on_one_process_loads_into_two_exactly(saved: Path, case: str) -> None:
    result = load_case(saved, case)
    one, loaded = result["one"], result["one_to_two"]
    assert all(v.abs().sum() > 0 for states in one["optimizer"].values() for v in states.values())  # it trained
    assert_equal_states(loaded["weights"], one["weights"])
    assert_equal_states(loaded["optimizer"], one["optimizer"])
    for path, states in loaded["column_shards"].items():  # every column shard took the row's accumulator
        for key, split in states.items():
            for values in split["values"]:
                assert torch.equal(values, one["optimizer"][path][key]), (path, key)


@pytest.mark.parametrize("case", CASES)
def test_state_saved_on_two_processes_loads_on_one_exactly(saved: Path, case: str) -> None:
    result = load_case(saved, case)
    two = result["two"]
    net = one_process(case.split(".")[1])
    net.load_state_dict(two["weights"])
    load_fused_optimizer_state(net, two["optimizer"])
    assert_equal_states({k: v.detach() for k, v in net.state_dict().items()}, two["weights"])
    assert_equal_states(fused_state(net), two["optimizer"])
    with torch.no_grad():
        preds = net(random_kjt(make_tables(TABLES), 16, seed=1234))
    torch.testing.assert_close(preds, result["two_preds"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_state_saved_on_two_processes_reloads_into_two_exactly(saved: Path, case: str) -> None:
    """Every rank's weight and optimizer shards, column shards' own row-wise accumulators included."""
    differences = load_case(saved, case)["two_to_two"]
    assert len(differences) == 2 and all(d["shards"] > 0 for d in differences)
    assert all(d["weights"] == 0 and d["optimizer"] == 0 for d in differences), differences


def test_loading_shards_from_a_state_with_other_entries_is_a_clear_error(saved: Path) -> None:
    errors = json.loads((saved / "errors.json").read_text())
    assert "1 unexpected (first: ['emb.extra.weight'])" in errors["weights_unexpected"]
    assert "1 missing entries (first: ['emb.tables.embedding_bags.t0.weight'])" in errors["weights_missing"]
    assert "1 unexpected (first: ['emb.tables/t9.0'])" in errors["optimizer_unexpected"]
    assert "5 missing entries" in errors["optimizer_missing"]
    assert all("load it into the model that wrote it" in message for message in errors.values())


def test_loading_fused_state_with_other_entries_or_shapes_on_one_process_is_a_clear_error() -> None:
    net = one_process("full")
    state = fused_state(net)
    with pytest.raises(ValueError, match=r"1 unexpected \(first: \['emb.tables/t9.0'\]\)"):
        load_fused_optimizer_state(net, {"emb.tables": {**state["emb.tables"], "t9.0": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"1 missing entries \(first: \['emb.tables/t0.0'\]\)"):
        load_fused_optimizer_state(net, {"emb.tables": {k: v for k, v in state["emb.tables"].items() if k != "t0.0"}})
    doubled = {"emb.tables": {**state["emb.tables"], "t0.0": torch.zeros(14)}}  # the old column-wise layout
    with pytest.raises(ValueError, match=r"emb.tables/t0.0 has shape \(14,\), the table expects \(7,\)"):
        load_fused_optimizer_state(net, doubled)


def test_a_column_wise_lightning_checkpoint_resumes_exactly_on_two_processes_and_on_one(
    saved: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    first = torch.load(saved / "lightning.ckpt", weights_only=False)
    assert first["fused_optimizer_column_shards"]  # qr's tables were split in columns
    for name in ("lightning.resumed.ckpt", None):  # resumed on 2 processes by the worker, on 1 here
        if name is None:
            data = CTRDataModule(data_dir=str(tiny_dataset), batch_size=64)
            task = CTRTask.load_from_checkpoint(saved / "lightning.ckpt", map_location="cpu")
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=LIGHTNING_STEPS,
                limit_val_batches=0,
                inference_mode=False,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(task, datamodule=data, ckpt_path=saved / "lightning.ckpt")  # at its last step: restores only
            trainer.save_checkpoint(tmp_path / "one.ckpt")
        again = torch.load(saved / name if name else tmp_path / "one.ckpt", weights_only=False)
        assert_equal_states(again["state_dict"], first["state_dict"])
        assert_equal_states(again["fused_optimizer_state"], first["fused_optimizer_state"])
        if name is not None:  # two processes restored each column shard's own accumulator
            assert_equal_states(again["fused_optimizer_column_shards"], first["fused_optimizer_column_shards"])


@pytest.mark.parametrize("width", [0, 6])
def test_a_column_shard_dim_that_is_not_a_positive_multiple_of_4_is_a_clear_error(width: int) -> None:
    with pytest.raises(ValueError, match=rf"column_shard_dim must be a positive multiple of 4.*got {width}"):
        _column_constraints(build("full", make_tables(TABLES)), width)

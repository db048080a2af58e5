"""Checkpoints of sharded runs move between 1 and 2 processes exactly, for every CPU sharding type.

One 2-process run of ``tests/checkpoint_worker.py`` covers table-wise, column-wise and table-column-wise sharding
(column shards 4 wide, so the dim-8 tables split in two) of several methods: the one-process state loaded into
shards, the sharded state exported and loaded on one process (here) and into fresh shards, weights and fused
optimizer state (row-wise Adagrad accumulators, element-wise Adagrad for the mixed model's unpooled tables); and the
same state written by ``torch.distributed.checkpoint`` (each rank its own shards) and read back on one process
(here), on two with the same plan and on two with another.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata

from recsys_embed.data import CTRDataModule
from recsys_embed.methods import Budget
from recsys_embed.methods.fused import FusedTables, fuse_tables
from recsys_embed.training import CTRTask, EmbeddingSpec, TorchRecStrategy, distributed_checkpoint
from recsys_embed.training.distributed_checkpoint import (
    SHARDS_KEY,
    check_block_widths,
    consolidate_checkpoint,
    consolidated_checkpoint,
    main,
    read_sharded_state,
    remove_checkpoints,
)
from recsys_embed.training.planning import _column_constraints
from recsys_embed.training.sharded_state import load_fused_optimizer_state, load_sharded_state
from tests.checkpoint_worker import LIGHTNING_STEPS, OPTIMIZER, TABLES, build, cases, lightning_trainer
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
    ranks = json.loads((saved / "errors.json").read_text())
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # every rank raised alike (none went on alone)
    errors = ranks[0]
    assert "1 unexpected (first: ['emb.extra.weight'])" in errors["weights_unexpected"]
    assert "1 missing entries (first: ['emb.tables.embedding_bags.t0.weight'])" in errors["weights_missing"]
    assert "1 unexpected (first: ['emb.tables/t9.0'])" in errors["optimizer_unexpected"]
    assert "5 missing entries" in errors["optimizer_missing"]
    assert "does not match the model" in errors["shards_other_model"]
    assert re.search(
        r"2 entries of the sharded checkpoint .* have other shapes than the model's \(first: "
        r"emb.tables.embedding_bags.t0.weight, saved \(7, 8\), model \(8, 8\)\)",
        errors["shards_other_shapes"],
    ), errors["shards_other_shapes"]
    assert re.search(  # the bug: only the rank holding t0 raised; the other went on to the next collective
        r"1 entries of the fused optimizer state have other shapes than the model's \(first: emb.tables/t0.0, saved "
        r"\(7, 8\), model \(7,\)\)",
        errors["optimizer_other_shape"],
    ), errors["optimizer_other_shape"]
    assert all("load it into the model that wrote it" in message.lower() for message in errors.values())


def test_loading_fused_state_with_other_entries_or_shapes_on_one_process_is_a_clear_error() -> None:
    net = one_process("full")
    state = fused_state(net)
    with pytest.raises(ValueError, match=r"1 unexpected \(first: \['emb.tables/t9.0'\]\)"):
        load_fused_optimizer_state(net, {"emb.tables": {**state["emb.tables"], "t9.0": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"1 missing entries \(first: \['emb.tables/t0.0'\]\)"):
        load_fused_optimizer_state(net, {"emb.tables": {k: v for k, v in state["emb.tables"].items() if k != "t0.0"}})
    doubled = {"emb.tables": {**state["emb.tables"], "t0.0": torch.zeros(14)}}  # the old column-wise layout
    with pytest.raises(ValueError, match=r"other shapes.*\(first: emb.tables/t0.0, saved \(14,\), model \(7,\)\)"):
        load_fused_optimizer_state(net, doubled)


def assert_same_checkpoint_state(got: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("state_dict", "fused_optimizer_state", "fused_optimizer_column_shards"):
        assert_equal_states(got[key], expected[key])


def test_a_two_process_lightning_checkpoint_keeps_each_ranks_shards_beside_the_file(saved: Path) -> None:
    """The file holds the dense layers only; the tables and their fused optimizer state are in the folder."""
    file = torch.load(saved / "lightning.ckpt", weights_only=False)
    assert re.fullmatch(r"lightning\.ckpt\.shards-[0-9a-f]{12}", file[SHARDS_KEY]), file[SHARDS_KEY]
    assert [p.name for p in saved.glob("lightning.ckpt.*")] == [file[SHARDS_KEY]]  # a new folder each save
    assert "fused_optimizer_state" not in file and "fused_optimizer_column_shards" not in file
    assert not any(".embedding_bags." in key for key in file["state_dict"]) and file["state_dict"]
    names = {p.name for p in (saved / file[SHARDS_KEY]).iterdir()}
    assert names == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not list(saved.glob("removed.ckpt*"))  # with the folders crashed saves left beside it


def test_a_save_that_crashes_before_its_file_leaves_the_previous_checkpoint_whole(saved: Path) -> None:
    """The bug: the new shards replaced the folder the old file names, so the old file loaded the new tables."""
    resumed = consolidated_checkpoint(saved / "lightning.resumed.ckpt")
    assert_same_checkpoint_state(consolidated_checkpoint(saved / "crash.ckpt"), resumed)  # as saved before
    listing = json.loads((saved / "crash.json").read_text())
    named = torch.load(saved / "crash.ckpt", weights_only=False)[SHARDS_KEY]
    assert len(listing["crashed"]) == 2 and named in listing["crashed"]  # and the crashed save's own, unnamed


def test_the_next_save_removes_the_folders_of_crashed_saves(saved: Path) -> None:
    listing = json.loads((saved / "crash.json").read_text())
    assert listing["saved_again"] == [torch.load(saved / "stale.ckpt", weights_only=False)[SHARDS_KEY]]


def test_a_stage_folder_cleanup_removes_every_checkpoint_and_shards_folder(tmp_path: Path) -> None:
    """Also the folders of a crashed first save, whose file was never written."""
    for name in ("last.ckpt", "final.ckpt"):
        (tmp_path / name).write_bytes(b"")
    for name in ("last.ckpt.shards-0123456789ab", "last.ckpt.shards.tmp", "never.ckpt.shards-0123456789ab"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").write_bytes(b"")
    (tmp_path / "stages.json").write_text("{}")
    remove_checkpoints(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["stages.json"]


def test_a_sharded_lightning_checkpoint_consolidates_into_the_one_file_export(saved: Path, tmp_path: Path) -> None:
    """The same trained state, saved with each rank's shards and gathered into one file, consolidates alike."""
    main([str(saved / "lightning.ckpt"), str(tmp_path / "one.ckpt")])
    consolidated = torch.load(tmp_path / "one.ckpt", weights_only=False)
    gathered = torch.load(saved / "lightning.consolidated.ckpt", weights_only=False)
    assert SHARDS_KEY not in consolidated and consolidated["fused_optimizer_column_shards"]  # qr split in columns
    assert_same_checkpoint_state(consolidated, gathered)
    assert consolidated["global_step"] == gathered["global_step"] == LIGHTNING_STEPS


def test_a_column_wise_lightning_checkpoint_resumes_exactly_on_two_processes_and_on_one(
    saved: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    first = consolidated_checkpoint(saved / "lightning.ckpt")
    assert first["fused_optimizer_column_shards"]  # qr's tables were split in columns
    # resumed on 2 processes from the shards by the worker (and saved with shards again)
    assert_same_checkpoint_state(consolidated_checkpoint(saved / "lightning.resumed.ckpt"), first)
    for source in ("lightning.ckpt", "lightning.consolidated.ckpt"):  # on 1 process: consolidated, or gathered
        path = tmp_path / "one_file.ckpt"
        if source == "lightning.ckpt":
            consolidate_checkpoint(saved / source, path)
        else:
            path = saved / source
        data = CTRDataModule(data_dir=str(tiny_dataset), batch_size=64)
        task = CTRTask.load_from_checkpoint(path, map_location="cpu")
        trainer = lightning_trainer()
        trainer.fit(task, datamodule=data, ckpt_path=path)  # at its last step: restores only
        trainer.save_checkpoint(tmp_path / "one.ckpt")
        again = torch.load(tmp_path / "one.ckpt", weights_only=False)
        assert_equal_states(again["state_dict"], first["state_dict"])
        assert_equal_states(again["fused_optimizer_state"], first["fused_optimizer_state"])


def test_a_sharded_checkpoint_resumes_and_predicts_exactly_on_one_process_with_the_torchrec_strategy(
    saved: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """Saved column-wise on 2 ranks, loaded table-wise on 1 straight from the shards folder (no consolidation)."""
    data = CTRDataModule(data_dir=str(tiny_dataset), batch_size=64)
    task = CTRTask(data.cardinalities, data.num_dense, 8, EmbeddingSpec("qr", Budget(ratio=4)))
    trainer = lightning_trainer(strategy=TorchRecStrategy(sharding_types=["table_wise"]))
    environment = dict(os.environ)  # Lightning exports MASTER_PORT, WORLD_SIZE: later spawned ranks must not see them
    try:
        trainer.fit(task, datamodule=data, ckpt_path=saved / "lightning.ckpt")  # at its last step: restores only
        trainer.save_checkpoint(tmp_path / "one.ckpt")  # one rank: gathered into the one file
        preds = trainer.predict(task, dataloaders=data.val_dataloader(), ckpt_path=saved / "lightning.ckpt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    again = torch.load(tmp_path / "one.ckpt", weights_only=False)
    gathered = torch.load(saved / "lightning.consolidated.ckpt", weights_only=False)
    assert SHARDS_KEY not in again
    assert_equal_states(again["state_dict"], gathered["state_dict"])
    assert_equal_states(again["fused_optimizer_state"], gathered["fused_optimizer_state"])
    one = CTRTask.load_from_checkpoint(saved / "lightning.consolidated.ckpt", map_location="cpu")
    with torch.no_grad():
        expected = [torch.sigmoid(one(batch)) for batch in data.val_dataloader()]
    torch.testing.assert_close(torch.cat(preds), torch.cat(expected), rtol=0, atol=1e-6)


def test_a_sharded_checkpoint_without_the_torchrec_strategy_or_without_its_folder_is_a_clear_error(
    saved: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        ValueError, match=r"keeps its tables in the folder 'lightning\.ckpt\.shards-[0-9a-f]+'.*consolid"
    ):
        CTRTask.load_from_checkpoint(saved / "lightning.ckpt", map_location="cpu")
    (tmp_path / "lightning.ckpt").write_bytes((saved / "lightning.ckpt").read_bytes())  # the file alone
    with pytest.raises(ValueError, match=r"lightning\.ckpt\.shards-[0-9a-f]+ \(its .metadata is missing\).*Copy the"):
        consolidate_checkpoint(tmp_path / "lightning.ckpt", tmp_path / "one.ckpt")
    with pytest.raises(ValueError, match="Write the consolidated checkpoint to another file"):
        consolidate_checkpoint(saved / "lightning.ckpt", saved / "lightning.ckpt")


@pytest.mark.parametrize("case", CASES)
def test_each_rank_writes_only_its_own_shards(saved: Path, case: str) -> None:
    """Every saved chunk is in the file of the rank holding that shard; under table-wise sharding no rank's file
    holds every table."""
    result, folder = load_case(saved, case), saved / f"{case}.shards"
    owners = {(key, tuple(offsets)): rank for key, held in result["owners"].items() for rank, offsets in held}
    files: dict[str, set[str]] = {}
    for index, where in dcp.FileSystemReader(folder).read_metadata().storage_data.items():
        assert where.relative_path == f"__{owners[(index.fqn, tuple(index.offset))]}_0.distcp", index
        files.setdefault(where.relative_path, set()).add(index.fqn)
    assert set(files) == {"__0_0.distcp", "__1_0.distcp"}
    assert len(owners) == sum(1 for _ in dcp.FileSystemReader(folder).read_metadata().storage_data)
    if case.startswith("table_wise."):
        tables = set(result["owners"])
        assert all(keys < tables for keys in files.values()), files


@pytest.mark.parametrize("case", CASES)
def test_a_sharded_checkpoint_read_on_one_process_is_the_consolidated_export(saved: Path, case: str) -> None:
    result = load_case(saved, case)
    export = result["two"]
    weights, optimizer, column_shards = read_sharded_state(saved / f"{case}.shards")
    assert_equal_states(weights, {k: v for k, v in export["weights"].items() if k in weights})
    tables = {k for k in export["weights"] if re.search(r"\.(embedding_bags|embeddings)\.t\d+\.weight$", k)}
    assert set(weights) == tables and "head.weight" not in weights  # dense entries: in the .ckpt file
    assert_equal_states(optimizer, export["optimizer"])
    assert_equal_states(column_shards, export["column_shards"])
    net = one_process(case.split(".")[1])
    net.load_state_dict({**export["weights"], **weights})
    load_fused_optimizer_state(net, optimizer)
    with torch.no_grad():
        preds = net(random_kjt(make_tables(TABLES), 16, seed=1234))
    torch.testing.assert_close(preds, result["two_preds"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_a_sharded_checkpoint_reloads_into_two_exactly_with_the_same_plan_and_as_the_export_with_another(
    saved: Path, case: str
) -> None:
    result = load_case(saved, case)
    cross = result["dcp_cross"]
    assert cross["plan"] != case.split(".")[0]
    for differences in (result["dcp_two_to_two"], cross["differences"]):
        assert len(differences) == 2 and all(d["shards"] > 0 for d in differences)
        assert all(d["weights"] == 0 and d["optimizer"] == 0 for d in differences), differences


@pytest.mark.parametrize("width", [0, 6])
def test_a_column_shard_dim_that_is_not_a_positive_multiple_of_4_is_a_clear_error(width: int) -> None:
    with pytest.raises(ValueError, match=rf"column_shard_dim must be a positive multiple of 4.*got {width}"):
        _column_constraints(build("full", make_tables(TABLES)), width)


def test_a_table_whose_dim_is_not_a_multiple_of_4_is_a_clear_error_in_a_sharded_checkpoint() -> None:
    """Row-wise state is saved in 4-column blocks; a dim-6 table (a plain stand-in for its sharded tensor) has none."""
    metadata = SimpleNamespace(shards_metadata=[ShardMetadata([0, 0], [10, 6], "rank:0/cpu")])
    table = SimpleNamespace(size=lambda: torch.Size([10, 6]), metadata=lambda: metadata)  # all ranks see its layout
    with pytest.raises(ValueError, match=r"dim 6 with column shards \[6\].*multiples of 4.*'consolidated'"):
        check_block_widths(table)  # type: ignore[arg-type]


def test_a_dense_entry_of_another_shape_is_a_clear_error_not_a_broadcast() -> None:
    layer = torch.nn.Linear(3, 2)
    state = {"weight": torch.zeros(3), "bias": torch.zeros(2)}  # (3,) would broadcast into (2, 3)
    with pytest.raises(ValueError, match=r"weight: saved shape \(3,\), the model's \(2, 3\)"):
        load_sharded_state(layer, state)


def test_a_model_that_sharded_checkpoints_cannot_hold_fails_at_setup_not_at_its_first_checkpoint(
    tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check ran only at the first save (possibly hours in); now setup fails before any step. Dims and column
    shards are multiples of 4 already (fbgemm, ``column_shard_dim``), so 16-column blocks stand in for a layout the
    blocks do not fit, and one process for several (``writes_shards``: what two ranks would give)."""
    monkeypatch.setattr(TorchRecStrategy, "writes_shards", property(lambda self: True))
    monkeypatch.setattr(distributed_checkpoint, "BLOCK", 16)
    data = CTRDataModule(data_dir=str(tiny_dataset), batch_size=64)
    task = CTRTask(data.cardinalities, data.num_dense, 8, EmbeddingSpec("full"))
    trainer = lightning_trainer(strategy=TorchRecStrategy(sharding_types=["table_wise"]))
    environment = dict(os.environ)  # as in the test above: later spawned ranks must not see Lightning's exports
    try:
        with pytest.raises(ValueError, match=r"dim 8 with column shards \[8\].*multiples of 16.*'consolidated'"):
            trainer.fit(task, datamodule=data)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    assert trainer.global_step == 0

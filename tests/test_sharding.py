"""Sharded training on TorchRec: 1 vs 2 CPU processes (gloo), checkpoints across world sizes, planner failures,
declared storage (pooled, unpooled, fp16, optimizer overrides) and undeclared collections.

The 2-process runs start ``tests/sharded_worker.py`` once per rank with torchrun's environment variables.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torchrec import EmbeddingBagCollection, EmbeddingCollection, EmbeddingConfig, JaggedTensor

from recsys_embed.cli import main
from recsys_embed.data import CTRDataModule
from recsys_embed.methods import SparseOptimizer, available_methods, build_embedding
from recsys_embed.methods.fused import fuse_tables
from recsys_embed.training import CTRTask, TorchRecStrategy, shard_model
from recsys_embed.training.distributed_checkpoint import SHARDS_KEY, consolidate_checkpoint, consolidated_checkpoint
from recsys_embed.training.sharding import _in_key_order, allowed_sharding_types
from tests.conftest import make_tables
from tests.sharded_worker import METHODS, MIXED_SHARDING, MIXED_STEPS
from tests.test_cli import TINY as CLI_TINY

WORKER = Path(__file__).with_name("sharded_worker.py")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
CONFIG = ROOT / "experiments" / "ctr" / "synthetic_dlrm.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    world: int, *args: str, timeout: int = TIMEOUT_S, worker: Path = WORKER
) -> list[subprocess.CompletedProcess[str]]:
    """Run ``worker`` on ``world`` processes (torchrun's environment) and wait for all of them."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            WORLD_SIZE=str(world),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            NODE_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {procs.index(proc)} did not finish in {timeout} s (a hang?)") from None
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The worker on 1 process, then on 2 (which also loads the 1-process checkpoints)."""
    out = {1: tmp_path_factory.mktemp("one_rank"), 2: tmp_path_factory.mktemp("two_ranks")}
    for world, extra in ((1, []), (2, ["--load", str(out[1])])):
        for rank, result in enumerate(launch(world, str(tiny_dataset), str(out[world]), *extra)):
            assert result.returncode == 0, f"{world} process(es), rank {rank} failed:\n{result.stderr[-4000:]}"
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_give_the_losses_of_one_on_the_same_global_batches(runs: dict[int, Path], method: str) -> None:
    one = json.loads((runs[1] / f"{method}.losses.json").read_text())
    two = json.loads((runs[2] / f"{method}.losses.json").read_text())
    assert len(one) == len(two) == 8
    assert one[0] != one[-1]  # it trained
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_checkpoint_saved_on_two_ranks_loads_on_one(
    runs: dict[int, Path], method: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    named = torch.load(runs[2] / f"{method}.ckpt", weights_only=False)[SHARDS_KEY]
    assert (runs[2] / named / ".metadata").is_file()  # each rank wrote its own shards
    consolidate_checkpoint(runs[2] / f"{method}.ckpt", tmp_path / "one.ckpt")
    task = CTRTask.load_from_checkpoint(tmp_path / "one.ckpt", map_location="cpu")  # plain, unfused tables
    batch = next(iter(CTRDataModule(data_dir=str(tiny_dataset), eval_batch_size=500).val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(task(batch), torch.load(runs[2] / f"{method}.preds.pt"))


@pytest.mark.parametrize("method", list(METHODS))
def test_a_checkpoint_saved_on_one_rank_loads_on_two(runs: dict[int, Path], method: str) -> None:
    torch.testing.assert_close(
        torch.load(runs[2] / f"{method}.loaded_preds.pt"), torch.load(runs[1] / f"{method}.preds.pt")
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_optimizer_state_moves_between_one_and_two_ranks(runs: dict[int, Path], method: str) -> None:
    def state(path: Path) -> dict[str, torch.Tensor]:
        saved = consolidated_checkpoint(path)["fused_optimizer_state"]  # a 2-rank one's from its shards folder
        return {f"{module}/{key}": value for module, states in saved.items() for key, value in states.items()}

    one, two = state(runs[1] / f"{method}.ckpt"), state(runs[2] / f"{method}.ckpt")
    assert one and set(one) == set(two)
    assert all(v.abs().sum() > 0 for v in one.values())  # the accumulators moved
    for key in one:  # 2 ranks accumulated what 1 did
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-7)
    resumed = state(runs[2] / f"{method}.resumed.ckpt")  # 1-rank state loaded into shards, gathered back
    assert set(resumed) == set(one)
    for key in one:
        torch.testing.assert_close(resumed[key], one[key], rtol=0, atol=0)


def test_every_registered_method_shards_and_keeps_its_outputs(tiny_dataset: Path, tmp_path: Path) -> None:
    results = launch(2, str(tiny_dataset), str(tmp_path), "--forward-all", timeout=180)
    assert all(r.returncode == 0 for r in results), [(r.returncode, r.stderr[:1500], r.stderr[-3000:]) for r in results]
    diffs = json.loads((tmp_path / "forward_diff.json").read_text())
    assert set(diffs) == set(available_methods())
    assert max(diffs.values()) < 1e-5, diffs


def test_a_plan_that_does_not_fit_fails_fast_on_every_rank(tiny_dataset: Path, tmp_path: Path) -> None:
    results = launch(2, str(tiny_dataset), str(tmp_path), "--memory-cap", "1024", timeout=120)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    for rank in range(2):
        message = (tmp_path / f"plan_error.{rank}.txt").read_text()
        assert "found no plan for the embedding tables on all 2 ranks (memory cap: 1024 bytes per rank)" in message
        assert "insufficient storage" in message and "Fix: raise the per-rank memory cap" in message


def test_cli_fit_on_two_processes_prints_the_plan_and_tests_the_checkpoint(tmp_path: Path) -> None:
    args = [*CLI_TINY, "--trainer.strategy=torchrec", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", RECSYS_EMBED_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "recsys_embed.cli", "fit", "--config", str(CONFIG), *args]
    result = subprocess.run(
        [*command, "--model.embedding.method=qr", "--model.embedding.budget.ratio=4", "--test_after_fit=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Sharding plan (4 tables on 2 ranks)" in result.stderr
    assert "table_wise -> rank" in result.stderr and "memory per rank" in result.stderr
    assert "test/auc" in result.stdout
    (last,) = tmp_path.glob("runs/synthetic_dlrm/**/checkpoints/last.ckpt")
    named = torch.load(last, weights_only=False)[SHARDS_KEY]
    assert (last.parent / named / ".metadata").is_file()  # test_after_fit loaded it on 2 ranks
    assert [p.name for p in last.parent.glob("last.ckpt.*")] == [named]  # earlier saves' folders deleted


def test_mixed_storage_shards_pooled_and_unpooled_tables_with_the_unsharded_outputs(runs: dict[int, Path]) -> None:
    """Sharded (2 ranks) == fused and plain unsharded forms, under each CPU sharding type of unpooled tables."""
    checks = json.loads((runs[2] / "mixed.forward.json").read_text())
    assert set(checks) == set(MIXED_SHARDING)
    for name, check in checks.items():
        assert check["vs_fused"] < 1e-6, (name, check)  # the same fbgemm kernels
        assert check["vs_plain"] < 1e-4, (name, check)  # the plain fp16 EmbeddingBag rounds its sums to fp16
        assert check["seq_keys"] and check["seq_lengths"] and check["seq_rows"] == 0, (name, check)
        plan = check["plan"]
        unpooled = {t: kind for t, kind in plan.items() if t.startswith("emb.seq.")}
        pooled = {t: kind for t, kind in plan.items() if not t.startswith("emb.seq.")}
        assert len(unpooled) == 2 and len(pooled) == 3, plan
        expected_pooled = "table_column_wise" if name == "row_wise" else name
        assert set(unpooled.values()) == {name} and set(pooled.values()) == {expected_pooled}, plan


def test_mixed_storage_trains_alike_on_one_and_two_processes(runs: dict[int, Path]) -> None:
    one = json.loads((runs[1] / "mixed.losses.json").read_text())
    two = json.loads((runs[2] / "mixed.losses.json").read_text())
    assert len(one) == len(two) == MIXED_STEPS and one[0] != one[-1]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    state_one, state_two = (torch.load(runs[w] / "mixed.state.pt") for w in (1, 2))
    assert set(state_one["weights"]) == set(state_two["weights"])
    assert state_two["weights"]["emb.low.embedding_bags.t4.weight"].dtype == torch.float16  # declared fp16
    assert state_two["weights"]["emb.seq.embeddings.t2.weight"].dtype == torch.float32
    for key, value in state_one["weights"].items():
        torch.testing.assert_close(state_two["weights"][key], value, rtol=1e-4, atol=1e-6)
    opt_one, opt_two = state_one["optimizer"], state_two["optimizer"]
    assert set(opt_one) == set(opt_two) == {"emb.bags", "emb.seq", "emb.low"}
    assert opt_two["emb.seq"]["t2.0"].shape == (3000, 8)  # its own optimizer: element-wise Adagrad
    assert opt_two["emb.bags"]["t1.0"].shape == (50,)  # the run's: row-wise Adagrad
    for path, states in opt_one.items():
        assert set(states) == set(opt_two[path])
        for key, value in states.items():
            assert value.abs().sum() > 0, (path, key)
            torch.testing.assert_close(opt_two[path][key], value, rtol=1e-4, atol=1e-7)


def test_mixed_storage_state_saved_on_one_process_loads_into_two(runs: dict[int, Path]) -> None:
    loaded = torch.load(runs[2] / "mixed.loaded.pt")
    torch.testing.assert_close(loaded["preds"], torch.load(runs[1] / "mixed.preds.pt"), rtol=0, atol=1e-6)
    saved = torch.load(runs[1] / "mixed.state.pt")["optimizer"]
    for path, states in saved.items():
        for key, value in states.items():
            torch.testing.assert_close(loaded["optimizer"][path][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["pooled", "unpooled"])
def test_an_undeclared_torchrec_collection_is_a_clear_error(kind: str) -> None:
    tables = make_tables((7, 50))
    if kind == "pooled":
        extra: torch.nn.Module = EmbeddingBagCollection(tables=make_tables((9,)), device=torch.device("cpu"))
    else:
        config = EmbeddingConfig(name="s", num_embeddings=9, embedding_dim=8, feature_names=["s"])
        extra = EmbeddingCollection(tables=[config], device=torch.device("cpu"))
    model = torch.nn.ModuleDict({"method": build_embedding("full", tables), "extra": extra})
    name = type(extra).__name__
    with pytest.raises(ValueError, match=rf"'extra' \({name}\) are not declared by any embedding method.*add_tables"):
        shard_model(model, SparseOptimizer(), device=torch.device("cpu"))


def test_sharding_already_fused_tables_is_a_clear_error() -> None:
    model = torch.nn.ModuleDict({"m": build_embedding("full", make_tables((7, 50)))})
    fuse_tables(model, SparseOptimizer())
    with pytest.raises(ValueError, match=r"'m.tables' of method 'full' are a FusedTables.*already fused"):
        shard_model(model, SparseOptimizer(), device=torch.device("cpu"))


def test_a_sharded_unpooled_collection_gives_its_keys_in_the_unsharded_order() -> None:
    rows = {k: JaggedTensor(values=torch.ones(1, 4), lengths=torch.tensor([1])) for k in ("b", "c", "a")}
    assert list(_in_key_order(torch.nn.Identity(), (), rows, keys=["a", "b", "c"])) == ["a", "b", "c"]


def test_unknown_sharding_types_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"row_wise.*not available on cpu for pooled tables.*row-wise needs CUDA"):
        allowed_sharding_types("cpu", ["row_wise"])
    assert "row_wise" in allowed_sharding_types("cuda")
    assert allowed_sharding_types("cpu", ["row_wise", "table_column_wise"], pooled=False) == ["row_wise"]
    assert allowed_sharding_types("cpu", pooled=False) == ["table_wise", "column_wise", "row_wise"]
    with pytest.raises(ValueError, match=r"not available on cpu for unpooled tables"):
        allowed_sharding_types("cpu", ["table_column_wise"], pooled=False)
    with pytest.raises(ValueError, match=r"data-parallel is not offered"):
        allowed_sharding_types("cpu", ["data_parallel"], pooled=None)
    with pytest.raises(ValueError, match="memory_cap_bytes must be positive"):
        TorchRecStrategy(memory_cap_bytes=0)
    with pytest.raises(ValueError, match="checkpoint_format must be 'sharded' or 'consolidated' \\(got 'dcp'\\)"):
        TorchRecStrategy(checkpoint_format="dcp")  # type: ignore[arg-type]


def test_sharding_without_a_process_group_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="init_process_group first"):
        shard_model(torch.nn.Linear(2, 2), SparseOptimizer(), device=torch.device("cpu"))


def test_strategy_options_come_from_a_config_class_path(capsys: pytest.CaptureFixture[str]) -> None:
    strategy = "{class_path: recsys_embed.training.TorchRecStrategy, init_args: {memory_cap_bytes: 1000000}}"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIG), f"--trainer.strategy={strategy}", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert printed["class_path"] == "recsys_embed.training.TorchRecStrategy"
    assert printed["init_args"]["memory_cap_bytes"] == 1000000


def test_a_module_without_net_and_sparse_optimizer_is_a_clear_error() -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_steps=1, logger=False)
    try:
        with pytest.raises(TypeError, match="shards `module.net` with `module.sparse_optimizer`; Plain lacks them"):
            trainer.fit(Plain(), train_dataloaders=[torch.zeros(1, 2)])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_several_processes_without_the_torchrec_strategy_stop_with_one_clear_error(tiny_dataset: Path) -> None:
    """DDP would leave each rank its own fused tables (checksums drift apart): refused before anything trains."""
    data = CTRDataModule(data_dir=str(tiny_dataset), batch_size=64)
    task = CTRTask(cardinalities=data.cardinalities, num_dense=data.num_dense, embedding_dim=8)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    task._trainer = trainer  # what Lightning sets before configure_model, on every rank
    with pytest.raises(ValueError, match=r"2 processes with strategy DDPStrategy.*--trainer.strategy torchrec"):
        task.configure_model()

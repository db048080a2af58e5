"""DeepLight: the sparse formats' bytes, the pruning schedule, the exact target, masked entries staying zero, the
packed served form, and every stage through ``recsys-embed fit`` (a kill inside the prune stage, ``--stage``) and the
benchmark runner, on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recsys_embed.benchmark import expand_grid, load_results, parse_spec, run_sweep
from recsys_embed.methods import Budget, build_embedding
from recsys_embed.methods.deeplight import DeepLight, scheduled_sparsity
from recsys_embed.methods.sparse_format import packed_bytes, packed_format
from recsys_embed.training.task_config import group_optimizer
from tests.conftest import make_tables, random_kjt
from tests.staged_cli import Killed, stage_state, staged_fit
from tests.test_bench import small_spec

CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "ctr" / "synthetic_deeplight.yaml")


def stored(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_sparse_bytes_are_the_smaller_of_csr_and_coo_with_the_smallest_int_dtypes() -> None:
    # 3000 rows, dim 8: cols int8; CSR row pointers (3001) hold nnz: int16 for 10_000; COO rows int16
    assert packed_bytes(3000, 8, 10_000) == 10_000 * (4 + 1) + 3000 * 2
    assert packed_format(3000, 8, 10_000) == "csr"
    assert packed_bytes(3000, 8, 100) == 100 * (4 + 2 + 1) and packed_format(3000, 8, 100) == "coo"
    assert packed_bytes(10, 200, 50) == 50 * (4 + 2) + 10 * 1  # dim 200: int16 columns; CSR 310 < COO 350
    assert packed_bytes(100_000, 16, 10) == 10 * (4 + 4 + 1)  # rows need int32


def test_the_schedule_prunes_every_ten_steps_to_the_formula_and_masked_entries_stay_zero() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    prune = DeepLight(tables, target_sparsity=0.8, rows_optimizer="adam").next_stage()  # dense gradients
    assert prune.stage == "prune" and prune.sparsity() == 0
    optimizer = torch.optim.Adam(prune.parameters(), lr=0.05)
    kjt = random_kjt(tables, batch=64, seed=1, allow_empty=False)
    total = sum(t.num_embeddings * t.embedding_dim for t in tables)
    for step in range(0, 3001):
        if step % 500 == 7:  # a training step between prunes: masked entries get no gradient and stay zero
            prune(kjt).values().pow(2).sum().backward()
            assert all((w.grad[~prune.mask(i)] == 0).all() for i, w in enumerate(prune.weights))
            optimizer.step()  # Adam's moments would move them: the mask is re-applied after the step
            optimizer.zero_grad()
        before = [m.clone() for m in prune.masks()]
        prune.on_train_step(step)
        assert all(not (m & ~b).any() for m, b in zip(prune.masks(), before))  # pruned entries never come back
        kept = sum(int(m.sum()) for m in prune.masks())
        if step % 10 == 0:  # one count over every table
            assert kept == round((1 - scheduled_sparsity(step, 0.8)) * total)
        else:
            assert kept == sum(int(b.sum()) for b in before)
        assert all((w[~prune.mask(i)] == 0).all() for i, w in enumerate(prune.weights))
    assert scheduled_sparsity(3000, 0.8) == pytest.approx(0.8 * (1 - 0.99**30))
    assert prune.sparsity() < 0.8 * 0.3  # the schedule only approaches the target ...
    before = [m.clone() for m in prune.masks()]
    prune.finish_stage(lambda batches: 0.5)
    assert prune.sparsity() == pytest.approx(0.8, abs=0.01)  # ... the stage's last prune reaches it
    assert sum(int(m.sum()) for m in prune.masks()) == round(0.2 * total)
    size = [w.detach().abs() for w in prune.weights]
    kept = torch.cat([a[m] for a, m in zip(size, prune.masks())])
    dropped = torch.cat([a[b & ~m] for a, b, m in zip(size, before, prune.masks())])
    assert kept.min() >= dropped.max()  # the largest entries over all tables, one cut
    shares = [float(m.float().mean()) for m in prune.masks()]
    assert shares[0] > shares[2]  # the small table's larger entries (TorchRec's init scales with 1/sqrt(rows)) stay


def test_sparse_grad_gives_gradients_of_the_batch_rows_only() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    emb = DeepLight(tables, rows_optimizer="sgd", sparse_grad=True)
    dense = DeepLight(tables, rows_optimizer="sgd")  # the default: dense gradients, for any optimizer
    kjt = random_kjt(tables, batch=16, seed=3, allow_empty=False)
    for form in (emb, dense):
        form(kjt).values().pow(2).sum().backward()
    grad = emb.weights[2].grad
    assert grad.is_sparse and not dense.weights[2].grad.is_sparse
    torch.testing.assert_close(grad.to_dense(), dense.weights[2].grad)  # the same gradient, stored sparse
    read = kjt["f2"].values().unique()
    assert set(grad.coalesce().indices()[0].tolist()) == set(read.tolist())


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_adagrad_rows_step_as_torch_adagrad_and_keep_their_state_from_stage_to_stage(sparse_grad: bool) -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    emb = DeepLight(tables, target_sparsity=0.5, sparse_grad=sparse_grad)  # rows_optimizer adagrad, lr 0.05
    reference = [torch.nn.Parameter(w.detach().clone()) for w in emb.weights]
    (group,) = emb.stage_parameter_groups()
    ours, theirs = group_optimizer(group, "deeplight"), torch.optim.Adagrad(reference, lr=0.05, eps=1e-10)
    for seed in range(3):
        kjt = random_kjt(tables, batch=16, seed=seed, allow_empty=False)
        ours.zero_grad()
        emb(kjt).values().pow(2).sum().backward()
        ours.step()
        theirs.zero_grad()
        pooled = [torch.nn.functional.embedding_bag(kjt[f].values(), w, kjt[f].offsets(), mode="sum")
                  for f, w in zip(("f0", "f1", "f2"), reference)]  # fmt: skip
        torch.cat(pooled, 1).pow(2).sum().backward()
        theirs.step()
    for w, r in zip(emb.weights, reference):
        torch.testing.assert_close(w.detach(), r.detach())
    prune = emb.next_stage()  # the accumulators go on with the next stage (one continuous Adagrad run)
    assert all(torch.equal(getattr(prune, f"adagrad_{i}"), getattr(emb, f"adagrad_{i}")) for i in range(3))
    assert prune.adagrad_2.count_nonzero() > 0 and stored(prune.to_serving()) == prune.memory_bytes()


def test_adagrad_rows_on_several_processes_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_embed.methods import deeplight

    tables = make_tables()
    kjt = random_kjt(tables, batch=4)
    monkeypatch.setattr(deeplight.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(deeplight.dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="keeps its rows' Adagrad state in each process.*rows_optimizer"):
        DeepLight(tables)(kjt)
    assert DeepLight(tables, rows_optimizer="sgd")(kjt).values().shape == (4, 24)  # averaged by the wrapper
    with pytest.raises(ValueError, match="sparse_grad=True needs rows_optimizer in"):
        DeepLight(tables, rows_optimizer="adam", sparse_grad=True)
    assert DeepLight(tables).eval()(kjt).values().shape == (4, 24)  # serving is fine


def test_a_budget_gives_the_target_with_index_overhead_and_each_stage_serves_its_outputs() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    for ratio in (3, 20):
        warmup = build_embedding("deeplight", tables, budget=Budget(ratio=ratio))
        allowed = Budget(ratio=ratio).max_bytes(tables)
        assert warmup.memory_bytes() <= allowed < warmup.memory_bytes() * 1.01
        assert warmup.compression_ratio() == pytest.approx(ratio, rel=0.01)
        assert warmup.target_sparsity > 1 - 1 / ratio  # the index overhead costs entries
        prune = warmup.next_stage()
        prune.finish_stage(lambda batches: 0.5)
        finetune = prune.next_stage()
        kjt = random_kjt(tables, batch=16, seed=2)
        for form in (warmup, prune, finetune):
            form.eval()
            served = form.to_serving()
            assert stored(served) == form.memory_bytes()
            torch.testing.assert_close(served(kjt).values(), form(kjt).values())
        formats = served.formats  # type: ignore[attr-defined]
        assert formats[2] == packed_format(3000, 8, int(finetune.mask(2).sum()))
        # after pruning, the trained (masked) training-mode outputs are the served ones
        finetune.train()
        torch.testing.assert_close(served(kjt).values(), finetune(kjt).values())
    assert "coo" in formats  # ratio 20: the small tables keep few entries, COO is smaller there


def test_bad_options_and_budgets_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="target_sparsity in"):
        DeepLight(make_tables(), target_sparsity=1.0)
    with pytest.raises(ValueError, match="stage must be one of"):
        DeepLight(make_tables(), stage="retrain")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one kept entry per table takes 19 bytes"):
        build_embedding("deeplight", make_tables((7, 50, 3000), dim=8), budget=Budget(bytes=18))
    with pytest.raises(ValueError, match="no stage after 'finetune'"):
        DeepLight(make_tables(), stage="finetune").next_stage()


# ---- every stage through the CLI and the benchmark -----------------------------------------------------------------
def fit(folder: Path, *extra: str) -> int | None:
    return staged_fit(CONFIG, folder, "--model.embedding.options={prune_every: 2}", *extra)


def test_fit_runs_every_stage_and_a_resume_inside_the_prune_stage_keeps_the_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int, float]] = []  # stage, step, the mask's sparsity before the step's hook
    kill: dict[str, int | None] = {"prune_step": 8}
    train_step = DeepLight.on_train_step

    def on_train_step(self: DeepLight, step: int) -> None:
        seen.append((self.stage, step, self.sparsity()))
        if self.stage == "prune" and step == kill["prune_step"]:
            raise Killed
        train_step(self, step)

    monkeypatch.setattr(DeepLight, "on_train_step", on_train_step)
    with pytest.raises(Killed):
        fit(tmp_path)
    first = {step: sparsity for stage, step, sparsity in seen if stage == "prune"}
    kill["prune_step"] = None
    seen.clear()
    fit(tmp_path)
    resumed = [(step, sparsity) for stage, step, sparsity in seen if stage == "prune"]
    assert resumed[0][0] in (6, 7) and resumed[0][0] > 0  # from the last checkpoint, not step 0
    assert resumed[0][1] == first[resumed[0][0]] > 0  # the mask came back with the checkpoint
    run = stage_state(tmp_path)
    assert run["order"] == ["warmup", "prune", "finetune"]
    assert all(run["stages"][n]["status"] == "done" and run["stages"][n]["time_s"] > 0 for n in run["order"])
    stages = tmp_path / "run" / "stages"
    prune_ckpt = torch.load(stages / "prune" / "final.ckpt", weights_only=True)
    prune, target = prune_ckpt["state_dict"], prune_ckpt["hyper_parameters"]["description"]["method"]["config"]
    finetune = torch.load(stages / "finetune" / "final.ckpt", weights_only=True)["state_dict"]
    masks = [k for k in prune if k.startswith("net.embedding.mask_")]
    kept = sum(int(prune[k].sum()) for k in masks)
    total = sum(prune[k].numel() for k in masks)
    served = sum(packed_bytes(*prune[k].shape, int(prune[k].sum())) for k in masks)
    assert target["target_sparsity"] > 0.75 and kept < total / 4
    assert 0.99 * target["target_bytes"] <= served <= target["target_bytes"]  # the budget's bytes, one cut
    for k in masks:  # finetune keeps the prune stage's mask, and its weights stay zero outside it
        assert torch.equal(prune[k], finetune[k])
        weight = finetune[k.replace("mask_", "weights.")]
        assert (weight[~finetune[k]] == 0).all() and (weight[finetune[k]] != 0).any()
    seen.clear()
    fit(tmp_path, "--stage=finetune")  # only the last stage reruns
    assert {stage for stage, _, _ in seen} == {"finetune"}


def test_the_benchmark_runs_every_stage_as_one_cell(tmp_path: Path) -> None:
    raw = small_spec(methods=[{"name": "deeplight", "budgets": [4]}], seeds=[0])
    assert run_sweep(expand_grid(parse_spec(raw)), tmp_path, progress=False)["ok"] == 1
    row = load_results(tmp_path).iloc[0]
    times = json.loads(row["stage_times"])["stages"]
    assert list(times) == ["warmup", "prune", "finetune"] and all(t > 0 for t in times.values())
    assert 4 * 0.99 <= row["ratio"] and row["steps"] == 9  # 3 per stage
    assert json.loads(row["resolved"])["target_sparsity"] > 0.75

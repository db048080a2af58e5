"""PEP: the packed sparse format's bytes and lookups, the soft thresholds, the mask fixed at the target sparsity,
the rewound retrain form, served == trained, and both stages through ``recsys-embed fit`` (kills inside and between
stages, ``--stage``) and the benchmark runner, on tiny synthetic data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

from recsys_embed.benchmark import expand_grid, load_results, parse_spec, run_sweep
from recsys_embed.methods import Budget, build_embedding
from recsys_embed.methods.pep import PEP
from recsys_embed.methods.sparse_format import PackedSparseTable, coo_bytes, csr_bytes, packed_bytes
from recsys_embed.training.task_config import group_optimizer
from tests.conftest import make_tables, random_kjt
from tests.staged_cli import Killed, stage_state, staged_fit
from tests.test_bench import small_spec

CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "ctr" / "synthetic_pep.yaml")


def stored(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_packed_tables_store_the_smaller_format_and_give_the_dense_rows() -> None:
    assert csr_bytes(3000, 16, 100) == 100 * (4 + 1) + 3000 * 1  # int8 columns, int8 row ends (they hold 100)
    assert coo_bytes(3000, 16, 100) == 100 * (4 + 2 + 1)  # int16 rows
    assert coo_bytes(100, 200, 7) == 7 * (4 + 1 + 2) and packed_bytes(10, 8, 80) == csr_bytes(10, 8, 80)
    g = torch.Generator().manual_seed(0)
    for rows, density in ((50, 0.6), (3000, 0.01)):  # dense enough for CSR; sparse enough for COO
        dense = torch.randn(rows, 16, generator=g) * (torch.rand(rows, 16, generator=g) < density)
        table = PackedSparseTable(rows, 16, int(dense.count_nonzero()))
        assert table.format == ("csr" if rows == 50 else "coo")
        table.pack(dense, dense != 0)
        assert stored(table) == packed_bytes(rows, 16, int(dense.count_nonzero()))
        ids = torch.tensor([0, rows - 1, 3, 3, 7, 0])
        torch.testing.assert_close(table.rows(ids), dense[ids])
        assert table.rows(torch.zeros(0, dtype=torch.long)).shape == (0, 16)
    with pytest.raises(ValueError, match="packs 5 kept entries"):
        PackedSparseTable(4, 4, 5).pack(torch.ones(4, 4), torch.ones(4, 4, dtype=torch.bool))


def test_soft_thresholds_shrink_entries_and_learn_from_the_loss() -> None:
    tables = make_tables()
    emb = PEP(tables, threshold_init=0.0)  # g = 0.5 > every initial |v|: everything is pruned
    shapes = {k: [tuple(t.shape) for t in PEP(tables, threshold_type=k).thresholds] for k in ("feature", "field")}
    assert [tuple(t.shape) for t in emb.thresholds] == [(7, 8), (50, 8), (3000, 8)]  # per id and dim: the default
    assert shapes == {"feature": [(7, 1), (50, 1), (3000, 1)], "field": [(1, 1)] * 3}
    assert torch.count_nonzero(emb.embeddings("f2", torch.arange(10))) == 0
    emb = PEP(tables, threshold_init=-15.0)
    with torch.no_grad():
        emb.thresholds[2][:, :4] = torch.logit(torch.tensor(0.002))  # dims 0..3 of t2: |v| shrinks by 0.002
    w = emb.weight(2)[:5].detach()
    rows = emb.embeddings("f2", torch.arange(5))
    expected = torch.cat([torch.sign(w[:, :4]) * (w[:, :4].abs() - 0.002).clamp(min=0), w[:, 4:]], 1)
    torch.testing.assert_close(rows, expected, atol=1e-6, rtol=0)
    rows.pow(2).sum().backward()  # shrinking lowers this loss: the thresholds' gradient is negative (they grow)
    grad = emb.thresholds[2].grad
    assert (grad[:5, :4][w[:, :4].abs() > 0.002] < 0).all() and (grad[:5, :4][w[:, :4].abs() <= 0.002] == 0).all()
    assert (grad[5:] == 0).all() and all(
        t.grad is None or not t.grad.any() for t in emb.thresholds[:2]
    )  # per id: only the ids read


@pytest.mark.parametrize("decay", [1e-4, 0.0])
def test_the_decay_lifts_every_threshold_about_threshold_lr_per_step(decay: float) -> None:
    tables = make_tables()
    emb = PEP(tables, threshold_lr=0.1, threshold_decay=decay)
    (group,) = emb.stage_parameter_groups()
    optimizer = group_optimizer(group, "pep")
    for seed in range(10):
        optimizer.zero_grad()
        (1e-3 * emb(random_kjt(tables, batch=8, seed=seed)).values().mean()).backward()  # a CTR loss's size
        optimizer.step()
    rise = torch.cat([t.detach().reshape(-1) for t in emb.thresholds]) + 15.0
    if decay:  # Adam normalises the decay's gradient: ~lr per step, ids read or not
        assert ((rise - 1.0).abs() < 0.05).all()
    else:  # the loss's gradient at t = -15 (times sigmoid'(-15) = 3e-7) is below Adam's epsilon: they stay put
        assert (rise.abs() < 0.01).all()


def test_the_mask_is_fixed_at_the_target_sparsity_within_one_percent() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    budget = Budget(ratio=5)
    emb = build_embedding("pep", tables, budget=budget)
    target = budget.max_bytes(tables)
    emb.on_train_step(0)
    assert not bool(emb.mask_fixed)  # t = -15: nothing pruned yet
    with torch.no_grad():  # thresholds grown past the target (far more than needed: a step that overshoots)
        for t in emb.thresholds:
            t.fill_(float(torch.logit(torch.tensor(0.9 * (1 / 7) ** 0.5))))
    emb.on_train_step(1)
    assert bool(emb.mask_fixed) and int(emb.reached_step) == 1
    assert 0.99 * target <= emb.memory_bytes() <= target  # the cut fills the budget
    emb.eval()
    served = emb.to_serving()
    assert stored(served) == emb.memory_bytes()
    kjt = random_kjt(tables, batch=16, seed=2)
    torch.testing.assert_close(served(kjt).values(), emb(kjt).values())


def test_an_unreached_target_is_cut_by_margin_at_the_stage_end(caplog: pytest.LogCaptureFixture) -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    emb = build_embedding("pep", tables, budget=Budget(ratio=8))
    with caplog.at_level(logging.WARNING):
        emb.finish_stage(lambda _: 0.5)
    assert "did not reach the target" in caplog.text and bool(emb.mask_fixed)
    target = Budget(ratio=8).max_bytes(tables)
    assert 0.99 * target <= emb.memory_bytes() <= target
    margins = torch.cat([(emb.weight(i).abs() - emb.gate(i)).reshape(-1) for i in range(3)])
    kept = torch.cat([m.reshape(-1) for m in emb.masks()])
    assert margins[kept].min() > margins[~kept].max()  # the largest margins, one cut over every table


def test_retrain_rewinds_the_kept_entries_and_trains_only_them() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    emb = build_embedding("pep", tables, budget=Budget(ratio=4), seed=3)
    kjt = random_kjt(tables, batch=32, seed=1)
    emb(kjt).values().sum().backward()
    with torch.no_grad():
        emb.weight(2).add_(1.0)  # "trained": the retrain form must not carry it
    emb.finish_stage(lambda _: 0.5)
    retrain = emb.next_stage()
    assert retrain.stage == "retrain" and not hasattr(retrain, "threshold")
    fresh = PEP(tables, **{**emb.config(), "stage": "retrain"})  # rebuilt before its mask is loaded: keeps all
    assert fresh.compression_ratio() < 1 and all(bool(m.all()) for m in fresh.masks())
    for i in range(3):
        torch.testing.assert_close(retrain.weight(i), emb.initial_rows(i) * emb.masks()[i])
        assert torch.equal(retrain.masks()[i], emb.masks()[i])
    assert retrain.memory_bytes() == emb.memory_bytes()
    with torch.no_grad():
        retrain.weight(2).add_(~retrain.masks()[2] * 5.0)  # pruned entries are multiplied by 0
    retrain.weight(2).grad = None
    retrain(kjt).values().pow(2).sum().backward()
    grad = retrain.get_submodule("rows_d8").embeddings["t2"].weight.grad
    assert torch.count_nonzero(grad[~retrain.masks()[2]]) == 0 and torch.count_nonzero(grad) > 0
    retrain.eval()
    served = retrain.to_serving()
    assert stored(served) == retrain.memory_bytes() and retrain.training_bytes() > retrain.memory_bytes()
    torch.testing.assert_close(served(kjt).values(), retrain(kjt).values())


def test_bad_options_and_budgets_are_clear_errors() -> None:
    tables = make_tables()
    with pytest.raises(ValueError, match="stage must be one of"):
        PEP(tables, stage="search")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold_type one of"):
        PEP(tables, threshold_type="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold_lr must be > 0"):
        PEP(tables, threshold_decay=-1.0)
    with pytest.raises(ValueError, match="one count per table"):
        PEP(tables, kept_entries=[1])
    with pytest.raises(ValueError, match="at least 6 bytes"):
        build_embedding("pep", tables, budget=Budget(bytes=5))


def fit(folder: Path, *extra: str) -> int | None:
    return staged_fit(CONFIG, folder, "--model.embedding.budget.ratio=4", *extra)


def test_fit_runs_both_stages_and_resumes_after_kills_inside_and_between_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[tuple[str, int]] = []
    kill: dict[str, object] = {"prune_step": 7, "next_stage": True}
    train_step, next_stage = PEP.on_train_step, PEP.next_stage

    def on_train_step(self: PEP, step: int) -> None:
        steps.append((self.stage, step))
        if self.stage == "prune" and step == kill["prune_step"]:
            raise Killed
        train_step(self, step)

    def killed_next_stage(self: PEP) -> PEP:
        if kill["next_stage"]:
            raise Killed
        return next_stage(self)  # type: ignore[return-value]

    monkeypatch.setattr(PEP, "on_train_step", on_train_step)
    monkeypatch.setattr(PEP, "next_stage", killed_next_stage)
    with pytest.raises(Killed):  # killed inside the prune stage
        fit(tmp_path)
    assert stage_state(tmp_path)["stages"]["prune"]["status"] == "running"
    kill["prune_step"] = None
    steps.clear()
    with pytest.raises(Killed):  # resumed at step 6 (the last checkpoint); killed between the stages
        fit(tmp_path)
    assert steps == [("prune", s) for s in range(6, 11)]
    assert stage_state(tmp_path)["stages"]["prune"]["status"] == "done"
    kill["next_stage"] = False
    steps.clear()
    fit(tmp_path)  # the prune stage is done: only the retrain runs
    assert steps == [("retrain", s) for s in range(11)]
    run = stage_state(tmp_path)
    assert run["order"] == ["prune", "retrain"]
    assert all(run["stages"][n]["status"] == "done" and run["stages"][n]["time_s"] > 0 for n in run["order"])
    stages = tmp_path / "run" / "stages"
    prune = torch.load(stages / "prune" / "final.ckpt", weights_only=True)["state_dict"]
    retrain = torch.load(stages / "retrain" / "final.ckpt", weights_only=True)["state_dict"]
    assert bool(prune["net.embedding.mask_fixed"])
    masks = sorted(k for k in retrain if k.startswith("net.embedding.mask_") and k != "net.embedding.mask_fixed")
    assert len(masks) == 4 and all(torch.equal(prune[k], retrain[k]) for k in masks)  # the mask carried over
    tables = torch.load(stages / "retrain" / "final.ckpt", weights_only=True)["hyper_parameters"]["description"]
    tables = tables["method"]["tables"]
    shapes = [(t["num_embeddings"], t["embedding_dim"]) for t in tables]
    served = sum(packed_bytes(n, d, int(retrain[k].sum())) for (n, d), k in zip(shapes, masks))
    full = sum(n * d * 4 for n, d in shapes)
    assert 0.99 * full / 4 <= served <= full / 4  # the target sparsity, index overhead included
    metrics = pd.concat([pd.read_csv(p) for p in tmp_path.glob("lightning_logs/*/metrics.csv")])
    assert all(metrics[f"stage_time_s/{n}"].notna().any() for n in run["order"])
    steps.clear()
    fit(tmp_path, "--stage=retrain")  # only the last stage reruns
    assert steps == [("retrain", s) for s in range(11)]
    steps.clear()
    fit(tmp_path, "--test_after_fit=true")  # every stage done: the final form rebuilt from its checkpoint, tested
    assert steps == []
    tested = pd.concat([pd.read_csv(p) for p in tmp_path.glob("lightning_logs/*/metrics.csv")])
    assert tested["test/auc"].notna().any()


def test_the_benchmark_runs_both_stages_as_one_cell(tmp_path: Path) -> None:
    raw = small_spec(methods=[{"name": "pep", "budgets": [4]}], seeds=[0])
    assert run_sweep(expand_grid(parse_spec(raw)), tmp_path, progress=False)["ok"] == 1
    row = load_results(tmp_path).iloc[0]
    times = json.loads(row["stage_times"])["stages"]
    assert list(times) == ["prune", "retrain"] and all(t > 0 for t in times.values())
    assert 4 * 0.999 <= row["ratio"] <= 4 / 0.99 and row["steps"] == 6  # 3 per stage
    assert row["training_bytes"] > row["memory_bytes"]  # the retrain form trains full rows and a mask
    assert json.loads(row["resolved"])["target_bytes"] >= row["memory_bytes"]

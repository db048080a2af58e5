"""OptEmbed: the supernet's threshold masks and random dims, the budget cut, the evolutionary search, the retrain
form and its served form, and every stage through ``recsys-embed fit`` (kills between and inside stages, ``--stage``)
and the benchmark runner, on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from recsys_embed.benchmark import expand_grid, load_results, parse_spec, run_sweep
from recsys_embed.data import CTRDataModule
from recsys_embed.methods import Budget, build_embedding
from recsys_embed.methods.optembed import OptEmbed
from recsys_embed.methods.row_pruning import served_bytes
from recsys_embed.training import CTRTask
from recsys_embed.training.search import evolutionary_search
from recsys_embed.training.stages import validation_auc
from recsys_embed.training.task_config import EmbeddingSpec
from tests.conftest import make_tables, random_kjt
from tests.staged_cli import Killed, stage_state, staged_fit
from tests.test_bench import small_spec

CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "ctr" / "synthetic_optembed.yaml")


def stored(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_supernet_threshold_prunes_rows_and_its_gradient_reaches_the_thresholds() -> None:
    emb = OptEmbed(make_tables())
    norms = emb.weight(2).abs().sum(1).detach()
    with torch.no_grad():
        emb.threshold[2] = norms.median()  # half of table t2's rows fall below
    low, high = int(norms.argmin()), int(norms.argmax())
    rows = emb.embeddings("f2", torch.tensor([low, high]))
    assert torch.count_nonzero(rows[0]) == 0 and torch.count_nonzero(rows[1]) == rows.shape[1]
    torch.testing.assert_close(rows[1], emb.weight(2)[high].detach())
    # rows near the threshold pass gradient to it through the straight-through step
    near = int((norms - norms.median()).abs().argsort()[1])
    emb.embeddings("f2", torch.tensor([near, low, high])).sum().backward()
    assert emb.threshold.grad is not None and emb.threshold.grad[2] != 0
    assert emb.threshold.grad[0] == 0 and emb.threshold.grad[1] == 0  # no id of t0, t1 in the batch
    # the regularizer pulls thresholds up (its gradient on t is -alpha * exp(-t) < 0)
    emb.threshold.grad = None
    emb.regularizer().backward()
    assert (emb.threshold.grad < 0).all()
    # eval (the served form) keeps exactly the rows above their threshold
    emb.eval()
    assert [int(m.sum()) for m in emb.keep_masks()][2] == int((norms > norms.median()).sum())


def test_supernet_trains_a_random_dim_per_field_each_batch() -> None:
    tables = make_tables((7, 50, 3000), dim=16)
    emb = OptEmbed(tables, seed=3)
    kjt = random_kjt(tables, batch=8, allow_empty=False)
    assert emb.active_dims.tolist() == [16, 16, 16]  # before the first step: full dims
    drawn = []
    for step in range(20):
        emb.on_train_step(step)
        drawn.append(tuple(emb.active_dims.tolist()))
        out = emb(kjt).to_dict()
        for f, d in zip(["f0", "f1", "f2"], drawn[-1]):
            assert torch.count_nonzero(out[f][:, d:]) == 0 and torch.count_nonzero(out[f][:, :d]) > 0
    assert {d for dims in drawn for d in dims} == {4, 8, 12, 16}  # every candidate dim trains
    again = OptEmbed(tables, seed=3)
    again.on_train_step(5)
    assert tuple(again.active_dims.tolist()) == drawn[5]  # seeded by the step: a resumed run draws the same
    emb.eval()
    assert torch.count_nonzero(emb(kjt).to_dict()["f2"][:, 4:]) > 0  # eval: the served dims (full in the supernet)


def test_budget_cut_fits_every_dims_and_keeps_the_largest_margins() -> None:
    tables = make_tables()
    emb = build_embedding("optembed", tables, budget=Budget(ratio=4))
    target = emb.target_bytes
    assert target == Budget(ratio=4).max_bytes(tables)
    masks = emb.keep_masks()
    assert emb.memory_bytes() <= target < emb.training_bytes()
    margins = torch.cat([emb.weight(i).abs().sum(1) - emb.threshold[i] for i in range(3)]).detach()
    kept = torch.cat(masks)
    assert margins[kept].min() > margins[~kept].max()  # one raised threshold over every field
    narrow = emb.keep_masks([4, 4, 4])  # narrower rows: more of them fit
    assert sum(int(m.sum()) for m in narrow) > sum(int(m.sum()) for m in masks)
    assert served_bytes(tables, [int(m.sum()) for m in narrow], [4, 4, 4]) <= target
    unbudgeted = OptEmbed(tables)
    assert unbudgeted.memory_bytes() == served_bytes(tables, [7, 50, 3000], [8, 8, 8])  # everything kept, no ids


def test_each_stage_serves_its_eval_outputs_at_exactly_memory_bytes() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    supernet = build_embedding("optembed", tables, budget=Budget(ratio=3))
    kjt = random_kjt(tables, batch=16, seed=2)
    search = supernet.next_stage()
    search.dims.copy_(torch.tensor([4, 8, 4]))
    retrain = search.next_stage()
    assert (supernet.stage, search.stage, retrain.stage) == ("supernet", "search", "retrain")
    for form in (supernet, search, retrain):
        form.eval()
        served = form.to_serving()
        assert stored(served) == form.memory_bytes() <= Budget(ratio=3).max_bytes(tables)
        torch.testing.assert_close(served(kjt).values(), form(kjt).values())
    assert retrain.config()["dims"] == [4, 8, 4] and stored(retrain) == retrain.memory_bytes()
    assert retrain.memory_bytes() == search.memory_bytes()
    # retrain_from="init": the kept rows start at the supernet's initial values (regenerated from the seed)
    masks = search.keep_masks()
    torch.testing.assert_close(retrain.weight(2), search.initial_rows(2)[masks[2]][:, :4])
    pruned = int((~masks[2]).nonzero()[0])
    assert torch.count_nonzero(retrain.embeddings("f2", torch.tensor([pruned]))) == 0  # pruned id: zero vector
    search.retrain_from = "supernet"  # kept as trained: the retrain form starts with the search form's outputs
    torch.testing.assert_close(search.next_stage().eval()(kjt).values(), search(kjt).values())


def test_search_is_deterministic_for_a_seed_and_improves_on_its_initial_population() -> None:
    target = (4, 16, 8, 12, 4, 16)

    def fitness(dims: tuple[int, ...]) -> float:
        return -float(sum(abs(a - b) for a, b in zip(dims, target)))

    first = evolutionary_search(fitness, [[4, 8, 12, 16]] * len(target), seed=1)
    second = evolutionary_search(fitness, [[4, 8, 12, 16]] * len(target), seed=1)
    assert first == second
    assert first.fitness > first.initial_fitness
    assert first.evaluations <= 20 + 30 * 20  # each distinct candidate scored once
    with pytest.raises(ValueError, match="mutation_prob must be in"):
        evolutionary_search(fitness, [[4], [4]], mutation_prob=2.0)


def test_bad_tables_and_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="dim 6 .* multiples of 4"):
        OptEmbed(make_tables(dim=6))
    with pytest.raises(ValueError, match="dims and kept_rows are given exactly in stage 'retrain'"):
        OptEmbed(make_tables(), dims=[4, 4, 4])
    with pytest.raises(ValueError, match=r"dims \[4, 12, 4\] and kept_rows \[7, 50, 10\] need one entry per table"):
        OptEmbed(make_tables(), stage="retrain", dims=[4, 12, 4], kept_rows=[7, 50, 10])
    with pytest.raises(ValueError, match="stage must be one of"):
        OptEmbed(make_tables(), stage="prune")  # type: ignore[arg-type]


# ---- every stage through the CLI and the benchmark -----------------------------------------------------------------
def fit(folder: Path, *extra: str) -> int | None:
    return staged_fit(
        CONFIG,
        folder,
        "--model.embedding.options={iterations: 2, mutations: 3, crossovers: 3, keep: 4, alpha: 0.01, "
        "threshold_lr: 0.01, search_batches: null}",
        "--model.embedding.budget.ratio=4",
        *extra,
    )


def test_fit_runs_every_stage_and_resumes_after_kills_between_and_inside_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[tuple[str, int]] = []
    searches: list[int] = []
    kill: dict[str, object] = {"supernet_step": 7, "search": True}
    train_step, finish = OptEmbed.on_train_step, OptEmbed.finish_stage

    def on_train_step(self: OptEmbed, step: int) -> None:
        steps.append((self.stage, step))
        if self.stage == "supernet" and step == kill["supernet_step"]:
            raise Killed
        train_step(self, step)

    def finish_stage(self: OptEmbed, evaluate: object) -> None:
        if self.stage == "search":
            searches.append(1)
            if kill["search"]:
                raise Killed
        finish(self, evaluate)  # type: ignore[arg-type]

    monkeypatch.setattr(OptEmbed, "on_train_step", on_train_step)
    monkeypatch.setattr(OptEmbed, "finish_stage", finish_stage)
    with pytest.raises(Killed):  # killed inside the supernet stage
        fit(tmp_path)
    assert stage_state(tmp_path)["stages"]["supernet"]["status"] == "running"
    kill["supernet_step"] = None
    steps.clear()
    with pytest.raises(Killed):  # resumed at step 6 (the last checkpoint), then killed inside the search
        fit(tmp_path)
    assert steps == [("supernet", s) for s in range(6, 11)]
    run = stage_state(tmp_path)
    assert run["stages"]["supernet"]["status"] == "done" and run["stages"]["search"]["status"] == "running"
    kill["search"] = False
    steps.clear()
    fit(tmp_path)  # the search reruns from the supernet's final checkpoint, then the retrain
    assert len(searches) == 2 and steps == [("retrain", s) for s in range(11)]
    run = stage_state(tmp_path)
    assert run["order"] == ["supernet", "search", "retrain"]
    assert all(run["stages"][n]["status"] == "done" and run["stages"][n]["time_s"] > 0 for n in run["order"])
    assert run["stages"]["search"]["steps"] == 0 and run["stages"]["retrain"]["steps"] == 11
    stages = tmp_path / "run" / "stages"
    search = torch.load(stages / "search" / "final.ckpt", weights_only=True)
    retrain = torch.load(stages / "retrain" / "final.ckpt", weights_only=True)
    config = retrain["hyper_parameters"]["description"]["method"]["config"]
    assert config["dims"] == search["state_dict"]["net.embedding.dims"].tolist()
    assert set(config["dims"]) <= {4, 8, 12, 16}
    tables = retrain["hyper_parameters"]["description"]["method"]["tables"]
    full = sum(t["num_embeddings"] * t["embedding_dim"] * 4 for t in tables)
    rows = {k: v for k, v in retrain["state_dict"].items() if k.startswith("net.embedding.")}
    assert sum(v.numel() * v.element_size() for v in rows.values()) <= full / 4  # the served rows fit the budget
    metrics = pd.concat([pd.read_csv(p) for p in tmp_path.glob("lightning_logs/*/metrics.csv")])  # one per fit
    assert all(metrics[f"stage_time_s/{n}"].notna().any() for n in run["order"])
    assert metrics["train/regularizer"].notna().any()
    searches.clear()
    steps.clear()
    fit(tmp_path, "--stage=retrain")  # only the last stage reruns
    assert searches == [] and steps == [("retrain", s) for s in range(11)]


def test_the_benchmark_runs_every_stage_as_one_cell(tmp_path: Path) -> None:
    options = {"iterations": 1, "mutations": 2, "crossovers": 2, "keep": 2}
    raw = small_spec(methods=[{"name": "optembed", "budgets": [4], "options": options}], seeds=[0])
    assert run_sweep(expand_grid(parse_spec(raw)), tmp_path, progress=False)["ok"] == 1
    row = load_results(tmp_path).iloc[0]
    times = json.loads(row["stage_times"])["stages"]
    assert list(times) == ["supernet", "search", "retrain"] and all(t > 0 for t in times.values())
    assert row["ratio"] >= 4 * 0.999 and row["steps"] == 6  # 3 per training stage, none in the search
    assert row["training_bytes"] == row["memory_bytes"]  # the retrain form trains only what it serves
    resolved = json.loads(row["resolved"])  # the searched dims and kept rows are recorded
    assert len(resolved["dims"]) == len(resolved["kept_rows"]) == 4 and resolved["iterations"] == 1


def test_the_stage_evaluator_gives_lightnings_validation_auc_and_reads_the_batches_once(
    tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = CTRDataModule(data_dir=str(tiny_dataset), batch_size=500, eval_batch_size=300)
    pl.seed_everything(0)
    task = CTRTask(data.cardinalities, data.num_dense, 8, EmbeddingSpec("hash", Budget(ratio=4)))
    trainer = pl.Trainer(
        max_steps=3, inference_mode=False, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(task, datamodule=data)
    (validated,) = trainer.validate(task, datamodule=data, verbose=False)
    opened = []
    loader = data.val_dataloader

    def counted() -> object:
        opened.append(1)
        return loader()

    data.val_dataloader = counted  # type: ignore[method-assign]
    evaluate = validation_auc(task, data)
    assert opened == []  # opened at the first call only
    first_two = evaluate(2)
    assert evaluate(2) == first_two and evaluate(1) != pytest.approx(first_two, abs=1e-9)
    assert opened == [1] and task.training  # the first batches are read once; its mode is restored
    assert evaluate() == pytest.approx(validated["val/auc"], abs=1e-6)  # the whole split, streamed
    assert opened == [1, 1] and first_two != pytest.approx(evaluate(), abs=1e-9)  # 2 of the 5 batches of 300 rows
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="runs on one process, not 2: run this stage with --trainer.devices 1"):
        evaluate(2)

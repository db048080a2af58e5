"""GraphTask: every registered method plugs into graph CF; training through Lightning; resume from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from recsys_embed.data import GraphDataModule, InteractionGraph
from recsys_embed.data.graph_datamodule import BPRBatch
from recsys_embed.methods import Budget, SparseOptimizer, available_methods
from recsys_embed.methods.fused import FusedTables, fuse_tables
from recsys_embed.models import MFBPR, NGCF, LightGCN
from recsys_embed.training import EmbeddingSpec, GraphTask
from tests.conftest import SMALL_TABLE_OPTIONS, UPDATED_IN_BACKWARD, budget_for

USERS, ITEMS = 200, 300
#: qr_path's d x d maps alone outweigh ratio 4 on these small tables
GRAPH_RATIO = {"qr_path": 2.5}
#: methods whose storage is dense parameters (cores, MLPs, masked tensors), with no fusable row tables
NO_FUSED_ROWS = {"dhe", "tt_rec", "deeplight", *UPDATED_IN_BACKWARD}  # quant/alpt: method-owned integer rows


def random_graph(seed: int = 0, users: int = USERS, items: int = ITEMS, pairs: int = 2000) -> InteractionGraph:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, users, pairs) * items + rng.integers(0, items, pairs))
    rng.shuffle(keys)
    test = keys[: len(keys) // 5]
    train = keys[len(keys) // 5 :]
    return InteractionGraph(
        users, items, {"train": (train // items, train % items), "test": (test // items, test % items)}
    )


def degrees(graph: InteractionGraph) -> dict[str, np.ndarray]:
    users, items = graph.pairs["train"]
    return {
        "user": np.bincount(users, minlength=graph.num_users),
        "item": np.bincount(items, minlength=graph.num_items),
    }


@pytest.mark.parametrize("fused", [False, True], ids=["dense_adam", "fused_rows"])
@pytest.mark.parametrize("name", available_methods())
def test_every_method_plugs_into_graph_cf(name: str, fused: bool) -> None:
    """One BPR step of LightGCN over each registered method: a finite loss, gradients reach the method's storage and
    the storage changes (fused fbgemm rows updated inside backward, or the dense optimizer's step)."""
    torch.manual_seed(0)
    graph = random_graph()
    budget = Budget(ratio=GRAPH_RATIO[name]) if name in GRAPH_RATIO else budget_for(name)
    task = GraphTask(
        USERS,
        ITEMS,
        embedding_dim=8,
        embedding=EmbeddingSpec(name, budget, dict(SMALL_TABLE_OPTIONS.get(name, {}))),
        model=lambda emb, u, i: LightGCN(emb, u, i, num_layers=2),
        sparse_optimizer=SparseOptimizer(name="sgd", lr=0.5) if fused else None,
        id_counts=degrees(graph),
    )
    task.net.set_graph(graph.normalized_adjacency())
    if fused:
        fuse_tables(task.net, task.sparse_optimizer)
        assert any(isinstance(m, FusedTables) for m in task.modules()) == (name not in NO_FUSED_ROWS)
    optimizers = task.configure_optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers] if optimizers else []
    before = {k: v.detach().clone() for k, v in task.embedding.state_dict().items()}  # integer rows included
    users, positives, negatives = graph.bpr_triples(seed=0)
    losses = task.bpr_loss(BPRBatch(users[:256], positives[:256], negatives[:256]))
    assert torch.isfinite(losses["loss"]) and losses["l2"] > 0
    losses["loss"].backward()
    dense = [p for p in task.embedding.parameters() if p.requires_grad and p.grad is not None]
    if (not fused or name in NO_FUSED_ROWS) and name not in UPDATED_IN_BACKWARD:  # those update in backward
        assert dense and any(p.grad.abs().sum() > 0 for p in dense)
    for opt in optimizers:
        opt.step()
    after = task.embedding.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    storage_paths = [s.path for s in task.embedding.storage()]
    if storage_paths:  # the declared row tables themselves were updated
        assert any(k.startswith(tuple(storage_paths)) for k in changed), (storage_paths, changed)
    else:
        assert changed


def write_graph(folder: Path, seed: int = 0) -> GraphDataModule:
    random_graph(seed, users=60, items=80, pairs=900).save(folder)
    return GraphDataModule(str(folder), batch_size=128, eval_users=25)


def make_task(data: GraphDataModule, sparse: SparseOptimizer | None = None, model=LightGCN) -> GraphTask:
    torch.manual_seed(0)
    return GraphTask(
        data.num_users,
        data.num_items,
        embedding_dim=8,
        embedding=EmbeddingSpec("hash", Budget(ratio=2)),
        model=model,
        sparse_optimizer=sparse,
        top_k=[5, 10],
    )


def trainer(root: Path, epochs: int, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        default_root_dir=root,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("sparse", [None, SparseOptimizer(name="rowwise_adagrad", lr=0.1)], ids=["adam", "fused"])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path: Path, sparse: SparseOptimizer | None) -> None:
    data = write_graph(tmp_path / "graph")
    straight = make_task(data, sparse)
    trainer(tmp_path / "a", 2, enable_checkpointing=False, num_sanity_val_steps=0).fit(straight, datamodule=data)
    first = make_task(data, sparse)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "b", 1, callbacks=[checkpoint], num_sanity_val_steps=0).fit(first, datamodule=data)
    resumed = make_task(data, sparse)
    run = trainer(tmp_path / "c", 2, enable_checkpointing=False, num_sanity_val_steps=0)
    run.fit(resumed, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert run.global_step == 2 * len(data.train_dataloader().dataset)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)
    first_state = first.state_dict()
    assert any(not torch.equal(first_state[k], v) for k, v in resumed.state_dict().items())
    loaded = GraphTask.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # rebuilt from the saved settings
    assert loaded.state_dict().keys() == first_state.keys()
    for key, value in first_state.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


def test_fit_validate_and_test_log_ranking_metrics(tmp_path: Path) -> None:
    data = write_graph(tmp_path / "graph")
    task = make_task(data, model=lambda emb, u, i: NGCF(emb, u, i, num_layers=2, node_dropout=0.1))
    run = trainer(tmp_path, 3, enable_checkpointing=False)
    untrained = run.validate(task, datamodule=data, verbose=False)[0]
    run.fit(task, datamodule=data)
    tested = run.test(task, datamodule=data, verbose=False)[0]
    assert set(tested) == {"test/recall@5", "test/ndcg@5", "test/recall@10", "test/ndcg@10"}
    assert all(0 <= v <= 1 for v in tested.values())
    assert set(untrained) == {"val/recall@5", "val/ndcg@5", "val/recall@10", "val/ndcg@10"}


def test_task_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top_k must list positive cut-offs"):
        GraphTask(10, 10, embedding_dim=8, top_k=[0])
    with pytest.raises(ValueError, match="needs id counts: pass id_counts"):
        GraphTask(10, 10, embedding_dim=8, embedding=EmbeddingSpec("adapt", Budget(ratio=2)))
    data = write_graph(tmp_path / "graph")
    task = GraphTask(data.num_users + 1, data.num_items, embedding_dim=8)
    with pytest.raises(ValueError, match="The data has 60 users and 80 items, the task 61 and 80"):
        trainer(tmp_path, 1).fit(task, datamodule=data)


def test_one_shared_node_table_takes_the_concatenated_degrees() -> None:
    graph = random_graph()
    task = GraphTask(
        USERS,
        ITEMS,
        embedding_dim=8,
        embedding=EmbeddingSpec("adapt", Budget(ratio=4)),
        shared_table=True,
        id_counts=degrees(graph),
    )
    assert [t.name for t in task.embedding.embedding_bag_configs()] == ["node"]
    task.net.set_graph(graph.normalized_adjacency())
    users, positives, negatives = graph.bpr_triples(seed=0)
    assert torch.isfinite(task.bpr_loss(BPRBatch(users[:64], positives[:64], negatives[:64]))["loss"])


def test_a_checkpoint_of_another_model_or_method_is_a_clear_error(tmp_path: Path) -> None:
    """MF-BPR and LightGCN checkpoints hold the same keys: without the description one would load into the other."""
    data = write_graph(tmp_path / "graph")
    mf = make_task(data, model=MFBPR)
    path = tmp_path / "mf.ckpt"
    pl.Trainer(logger=False, max_epochs=0, enable_progress_bar=False).fit(mf, datamodule=data)
    mf.trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="written by model recsys_embed.models.mf_bpr.MFBPR.*config.yaml"):
        GraphTask.load_from_checkpoint(path)  # rebuilds the default model, LightGCN
    loaded = GraphTask.load_from_checkpoint(path, model=MFBPR)
    assert isinstance(loaded.net, MFBPR)
    with pytest.raises(ValueError, match="written by method"):
        GraphTask(data.num_users, data.num_items, embedding_dim=8, embedding=EmbeddingSpec("hash", Budget(ratio=4)),
                  model=MFBPR).on_load_checkpoint(torch.load(path, weights_only=False))  # fmt: skip

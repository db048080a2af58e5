"""Graph CF models: propagation equals a dense reference, table layouts, and the all-rows path's gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys_embed.data import InteractionGraph
from recsys_embed.methods import SparseOptimizer, build_embedding
from recsys_embed.methods.fused import FusedTables, fuse_tables
from recsys_embed.models import MFBPR, NGCF, LightGCN, graph_tables

USERS, ITEMS, DIM = 4, 5, 8
TRAIN = (np.array([0, 0, 1, 2, 2, 2, 3]), np.array([0, 3, 1, 1, 2, 4, 0]))


def dense_adjacency() -> torch.Tensor:
    """``D^-1/2 A D^-1/2`` written out densely."""
    a = torch.zeros(USERS + ITEMS, USERS + ITEMS)
    for u, i in zip(*TRAIN):
        a[u, USERS + i] = a[USERS + i, u] = 1.0
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def with_graph(model):
    graph = InteractionGraph(USERS, ITEMS, {"train": TRAIN})
    model.set_graph(graph.normalized_adjacency())
    return model.eval()


def full_method(shared: bool = False):
    torch.manual_seed(0)
    return build_embedding("full", graph_tables(USERS, ITEMS, DIM, shared=shared))


def test_lightgcn_equals_the_dense_mean_of_powers() -> None:
    model = with_graph(LightGCN(full_method(), USERS, ITEMS, num_layers=3))
    users, items, ego = model()
    a = dense_adjacency()
    expected = (ego + a @ ego + a @ a @ ego + a @ a @ a @ ego) / 4
    torch.testing.assert_close(torch.cat([users, items]), expected)
    rows = model.embedding.tables.embedding_bags
    ego_rows = torch.cat([rows["user"].weight, rows["item"].weight])
    torch.testing.assert_close(ego, ego_rows)


def test_ngcf_equals_the_papers_matrix_form() -> None:
    model = with_graph(NGCF(full_method(), USERS, ITEMS, num_layers=2, message_dropout=0.5, node_dropout=0.5))
    users, items, ego = model()  # eval: no dropout
    a = dense_adjacency()
    layer, outputs = ego, [ego]
    for w1, w2 in zip(model.sum_transforms, model.product_transforms):
        sum_term = ((a + torch.eye(len(a))) @ layer) @ w1.weight.T + w1.bias
        product_term = ((a @ layer) * layer) @ w2.weight.T + w2.bias
        layer = F.leaky_relu(sum_term + product_term, 0.2)
        outputs.append(layer / layer.norm(dim=1, keepdim=True))
    torch.testing.assert_close(torch.cat([users, items]), torch.cat(outputs, 1))
    assert users.shape == (USERS, DIM * 3) and model.output_dim == DIM * 3


def test_ngcf_node_dropout_removes_the_dropped_nodes_messages() -> None:
    model = with_graph(NGCF(full_method(), USERS, ITEMS, num_layers=1, message_dropout=0.0, node_dropout=0.5))
    model.train()
    torch.manual_seed(5)
    dropped = model._dropped_graph().to_dense()
    torch.manual_seed(5)
    keep = (torch.rand(USERS + ITEMS) >= 0.5).float()
    torch.testing.assert_close(dropped, dense_adjacency() * keep[None, :] / 0.5)
    assert 0 < keep.sum() < len(keep)


def test_mf_bpr_is_the_ego_embeddings() -> None:
    model = MFBPR(full_method(), USERS, ITEMS)  # no graph needed
    users, items, ego = model()
    torch.testing.assert_close(torch.cat([users, items]), ego)


def test_one_shared_table_with_offset_ids_equals_two_tables() -> None:
    two = with_graph(LightGCN(full_method(), USERS, ITEMS))
    one = with_graph(LightGCN(full_method(shared=True), USERS, ITEMS))
    rows = two.embedding.tables.embedding_bags
    weight = torch.cat([rows["user"].weight, rows["item"].weight])
    one.embedding.tables.embedding_bags["node"].weight.data.copy_(weight)
    for a, b in zip(two(), one()):
        torch.testing.assert_close(a, b)


def test_model_errors_are_clear() -> None:
    wrong = build_embedding("full", graph_tables(USERS + 1, ITEMS, DIM))
    with pytest.raises(ValueError, match="Graph model tables must be features"):
        LightGCN(wrong, USERS, ITEMS)
    with pytest.raises(ValueError, match="has no graph: call set_graph"):
        LightGCN(full_method(), USERS, ITEMS)()
    with pytest.raises(ValueError, match=r"sparse \(9, 9\) tensor"):
        LightGCN(full_method(), USERS, ITEMS).set_graph(torch.zeros(9, 9))


@pytest.mark.parametrize("method", ["full", "hash", "qr", "tt_rec"])
def test_fused_all_rows_path_trains_the_storage(method: str) -> None:
    """The all-rows lookup of fused fbgemm tables is differentiable: one backward updates the rows in place."""
    torch.manual_seed(0)
    tables = graph_tables(40, 60, DIM)
    options = {"hash": {"rows": 20}, "qr": {"collisions": 3}, "tt_rec": {"rank": 4}}.get(method, {})
    emb = build_embedding(method, tables, **options)
    fused = fuse_tables(emb, SparseOptimizer(name="sgd", lr=0.5))
    model = LightGCN(emb, 40, 60, num_layers=2)
    rng = np.random.default_rng(0)
    pairs = (rng.integers(0, 40, 200), rng.integers(0, 60, 200))
    model.set_graph(InteractionGraph(40, 60, {"train": pairs}).normalized_adjacency())
    before = {k: v.detach().clone() for k, v in emb.state_dict().items() if v.is_floating_point()}
    users, items, _ = model()
    (users[:5] @ items[:7].T).sum().backward()
    changed = [k for k, v in emb.state_dict().items() if k in before and not torch.equal(before[k], v)]
    if fused:
        assert any(isinstance(m, FusedTables) for m in emb.modules())
        assert changed, "fused rows were not updated by backward"
    else:  # tt_rec keeps dense cores: their gradients reach the parameters
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.parameters())


def test_graph_models_are_not_offered_as_ctr_sweep_models() -> None:
    from recsys_embed.benchmark.spec import ModelEntry, available_models

    assert available_models() == ["DCN", "DCNv2", "DLRM", "DeepFM", "WideDeep"]
    with pytest.raises(ValueError, match="unknown model 'LightGCN'"):
        ModelEntry.parse("LightGCN")

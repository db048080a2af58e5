"""The contract every registered method keeps (DESIGN.md): one parametrized test suite over the whole registry."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods import (
    Budget,
    EmbeddingMethod,
    SparseOptimizer,
    available_methods,
    build_embedding,
    dense_parameters,
    load_method,
    method_class,
    save_method,
)
from recsys_embed.methods.fused import fuse_tables
from recsys_embed.methods.remap import RemapMethod
from recsys_embed.training.task_config import group_optimizer
from tests.conftest import UPDATED_IN_BACKWARD, budget_for, make_tables, method_options, random_kjt


def build(name: str, seed: int = 0) -> EmbeddingMethod:
    torch.manual_seed(seed)
    tables = make_tables()
    return build_embedding(name, tables, budget=budget_for(name), **method_options(name, tables))


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor the module saves (parameters and persistent buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.fixture(params=available_methods())
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_output_matches_a_full_ebc_layout(name: str) -> None:
    tables = make_tables()
    kjt = random_kjt(tables, batch=5)
    expected = EmbeddingBagCollection(tables=tables)(kjt)
    got = build(name)(kjt)
    assert got.keys() == expected.keys()
    assert got.length_per_key() == expected.length_per_key()
    assert got.values().shape == expected.values().shape


def assert_backward_updates_finite_state(emb: EmbeddingMethod, loss: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    loss.backward()
    after = emb.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("rows."))
    assert all(torch.isfinite(v.float()).all() for v in after.values())


def test_gradients_are_finite(name: str) -> None:
    emb = build(name)
    loss = emb(random_kjt(make_tables(), batch=6)).values().pow(2).sum()
    if name in UPDATED_IN_BACKWARD:
        assert_backward_updates_finite_state(emb, loss)
        return
    loss.backward()
    grads = [p.grad for p in emb.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g.coalesce().values() if g.is_sparse else g).all() for g in grads)


def test_memory_is_within_budget_and_equals_stored_tensors(name: str) -> None:
    emb = build(name)
    tables = make_tables()
    assert emb.memory_bytes() <= budget_for(name).max_bytes(tables)
    # a form that trains more than it serves (a supernet: every row) says so in training_bytes()
    assert emb.memory_bytes() == stored_bytes(emb) or emb.training_bytes() == stored_bytes(emb) > emb.memory_bytes()
    assert emb.compression_ratio() == pytest.approx(emb.full_bytes() / emb.memory_bytes())


def test_batch_invariance_each_row_alone_equals_whole_batch(name: str) -> None:
    emb = build(name)
    tables = make_tables()
    kjt = random_kjt(tables, batch=4, seed=1)
    whole = emb(kjt).values()
    for row, single in enumerate(_rows(kjt)):
        torch.testing.assert_close(emb(single).values()[0], whole[row])


def _rows(kjt: KeyedJaggedTensor) -> list[KeyedJaggedTensor]:
    per_key = kjt.to_dict()
    out = []
    for row in range(kjt.stride()):
        values = [per_key[k].to_dense()[row] for k in kjt.keys()]
        out.append(
            KeyedJaggedTensor(
                keys=kjt.keys(),
                values=torch.cat(values),
                lengths=torch.tensor([len(v) for v in values]),
                stride=1,
            )
        )
    return out


def test_empty_bags_pool_to_zero_and_empty_batch_works(name: str) -> None:
    emb = build(name)
    tables = make_tables()
    keys = [t.feature_names[0] for t in tables]
    empty_bags = KeyedJaggedTensor(
        keys=keys, values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(2 * len(keys), dtype=torch.long)
    )
    out = emb(empty_bags).values()
    assert out.shape == (2, sum(t.embedding_dim for t in tables))
    assert torch.count_nonzero(out) == 0
    empty_batch = KeyedJaggedTensor(
        keys=keys, values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long), stride=0
    )
    assert emb(empty_batch).values().shape[0] == 0


def test_state_dict_round_trip(name: str) -> None:
    source, target = build(name, seed=1), build(name, seed=2)
    kjt = random_kjt(make_tables(), batch=5)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(target(kjt).values(), source(kjt).values())


#: methods whose compressed tables are dense parameters (cores, MLPs), not rows: fused tables alone cannot fit the
#: task, so their "fused" mode is skipped (the "fused_and_dense" mode, as training runs them, checks that they learn)
DENSE_COMPRESSION = {
    "tt_rec": "its compressed tables are TT cores, trained by the dense optimizer",
    "dhe": "its large tables are MLP decoders, trained by the dense optimizer",
    "deeplight": "its tables are plain masked tensors (the mask is re-applied after each step), not fused",
    "dpq": "its outputs are codebook centroids, trained by the dense optimizer (the fused queries only pick them)",
    "mgqe": "its outputs are codebook centroids, trained by the dense optimizer (the fused queries only pick them)",
}


@pytest.mark.parametrize("mode", ["plain", "fused", "fused_and_dense"])
def test_loss_decreases_on_a_tiny_task(name: str, mode: str) -> None:
    """Regress each bag's sum onto a fixed random target; the method must fit it better after training: plain
    (Adagrad on every parameter), fused (fbgemm's Adagrad in the tables only), and as training runs it (row-wise
    Adagrad fused in the tables, the stage's parameter groups on their own optimizers, Adam on the other parameters)."""
    if mode == "fused" and name in DENSE_COMPRESSION:
        pytest.skip(f"{name!r}: {DENSE_COMPRESSION[name]}")
    tables = make_tables((7, 50, 3000), dim=8)
    torch.manual_seed(0)
    emb = build_embedding(name, tables, budget=budget_for(name, 2.0), **method_options(name, tables))
    kjt = random_kjt(tables, batch=64, seed=4, allow_empty=False)
    target = torch.randn(64, sum(t.embedding_dim for t in tables), generator=torch.Generator().manual_seed(5))
    optimizers: list[torch.optim.Optimizer] = []
    if mode == "plain":
        params = list(emb.parameters())  # none when the method updates its rows itself (UPDATED_IN_BACKWARD)
        optimizers += [torch.optim.Adagrad(params, lr=0.3)] if params else []
    elif mode == "fused":
        fuse_tables(emb, SparseOptimizer(name="adagrad", lr=0.3))
    else:  # the stage's own parameter groups get their optimizers, the rest Adam (as CTRTask does)
        fuse_tables(emb, SparseOptimizer(name="rowwise_adagrad", lr=0.3))
        groups = emb.stage_parameter_groups()
        owned = {id(p) for group in groups for p in group.params}
        dense = [p for p in dense_parameters(emb) if id(p) not in owned]
        optimizers += [torch.optim.Adam(dense, lr=1e-2)] if dense else []
        optimizers += [group_optimizer(group, name) for group in groups]

    def loss() -> torch.Tensor:
        return (emb(kjt).values() - target).pow(2).mean()

    first = loss().item()
    for _ in range(30):
        value = loss()
        value.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert loss().item() < 0.7 * first


# ---- the contract, second version (served form, config, save/load, per-id rows, batch shapes) ----------------------
def one_id_per_bag(tables: list[EmbeddingBagConfig], batch: int, seed: int = 0) -> KeyedJaggedTensor:
    """The production CTR shape: every feature has exactly one id per example."""
    g = torch.Generator().manual_seed(seed)
    keys = [f for t in tables for f in t.feature_names]
    cards = [t.num_embeddings for t in tables for _ in t.feature_names]
    values = torch.cat([torch.randint(0, n, (batch,), generator=g) for n in cards])
    return KeyedJaggedTensor(
        keys=keys, values=values, lengths=torch.ones(len(keys) * batch, dtype=torch.long), stride=batch
    )


def test_served_form_stores_memory_bytes_and_gives_the_trained_outputs(name: str) -> None:
    emb = build(name)
    fuse_tables(emb, SparseOptimizer(name="adagrad", lr=0.3))  # a trained form: fused kernels, one step taken
    kjt = random_kjt(make_tables(), batch=6, seed=2)
    emb(kjt).values().pow(2).sum().backward()
    served = emb.to_serving()
    assert not served.training
    assert stored_bytes(served) == emb.memory_bytes()
    assert emb.training_bytes() >= emb.memory_bytes()
    emb.eval()  # the served form gives the trained form's eval outputs (a supernet trains more rows than it serves)
    with torch.no_grad():
        torch.testing.assert_close(served(kjt).values(), emb(kjt).values())


def test_config_is_plain_and_rebuilds_the_same_form(name: str) -> None:
    emb = build(name, seed=1)
    config = emb.config()
    assert json.loads(json.dumps(config)) == json.loads(json.dumps(config, default=str))  # plain types only
    rebuilt = type(emb).from_config(make_tables(), config)
    assert rebuilt.config() == config
    assert rebuilt.memory_bytes() == emb.memory_bytes()
    rebuilt.load_state_dict(emb.state_dict())
    kjt = random_kjt(make_tables(), batch=5, seed=3)
    torch.testing.assert_close(rebuilt(kjt).values(), emb(kjt).values())


def test_save_and_load_alone(name: str, tmp_path: Path) -> None:
    emb = build(name, seed=1)
    save_method(emb, tmp_path / "method.pt")
    loaded = load_method(tmp_path / "method.pt", tables=make_tables())
    assert type(loaded) is type(emb) and loaded.config() == emb.config()
    kjt = random_kjt(make_tables(), batch=5, seed=3)
    torch.testing.assert_close(loaded(kjt).values(), emb(kjt).values())
    with pytest.raises(ValueError, match="built for other tables.*'t2'"):
        load_method(tmp_path / "method.pt", tables=make_tables((7, 50, 3001)))


def test_one_id_per_bag_equals_the_per_id_rows(name: str) -> None:
    """The usual CTR batch (uniform layout, the remaps' fast path) against ``embeddings()`` (the ragged path)."""
    emb = build(name)
    tables = make_tables()
    kjt = one_id_per_bag(tables, batch=32, seed=5)
    pooled = emb(kjt).to_dict()
    per_key = kjt.to_dict()
    for t in tables:
        for f in t.feature_names:
            torch.testing.assert_close(pooled[f], emb.embeddings(f, per_key[f].values()))
            torch.testing.assert_close(emb.all_embeddings(f, batch_size=700)[per_key[f].values()], pooled[f])


def test_per_id_rows_carry_gradients(name: str) -> None:
    emb = build(name)
    rows = emb.embeddings("f2", torch.tensor([0, 5, 2999]))
    assert rows.shape == (3, 8)
    if name in UPDATED_IN_BACKWARD:
        assert_backward_updates_finite_state(emb, rows.pow(2).sum())
        return
    rows.pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.parameters())


def test_mixed_dims_and_a_table_read_by_several_features(name: str) -> None:
    tables = [
        EmbeddingBagConfig(name="shared", num_embeddings=400, embedding_dim=8, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="wide", num_embeddings=3000, embedding_dim=16, feature_names=["c"]),
        EmbeddingBagConfig(name="tiny", num_embeddings=5, embedding_dim=8, feature_names=["d"]),
    ]
    torch.manual_seed(0)
    emb = build_embedding(name, tables, budget=budget_for(name, 2.0), **method_options(name, tables))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 5, (8,), generator=g)
    same = KeyedJaggedTensor(
        keys=["a", "b", "c", "d"],
        values=torch.cat([ids, ids, ids, ids]),
        lengths=torch.ones(32, dtype=torch.long),
        stride=8,
    )
    out = emb(same)
    assert out.keys() == ["a", "b", "c", "d"] and out.length_per_key() == [8, 8, 16, 8]
    torch.testing.assert_close(out["a"], out["b"])  # one table, same id -> same vector
    assert not torch.equal(out["a"], out["d"])


def test_permuted_keys_give_the_same_output(name: str) -> None:
    emb = build(name)
    kjt = random_kjt(make_tables(), batch=5, seed=8)
    order = [2, 0, 1]
    permuted = kjt.permute(order)
    assert permuted.keys() != kjt.keys()
    out = emb(permuted)
    assert out.keys() == kjt.keys()
    torch.testing.assert_close(out.values(), emb(kjt).values())


HUGE = 3 * 2**32  # ids well past 2^31: no int32 anywhere on the way
CANNOT_HOLD_HUGE = {
    "full": "stores every row",
    "mde": "keeps at least dim 4 per row (ratio <= 4 at dim 16)",
    "adapt": "needs per-id counts of every id",
    "optembed": "its supernet holds every row",
    "pep": "trains every row of a table and a mask of each entry",
    "deeplight": "its dense warm-up trains every entry",
    "quant": "stores every row (at 8 or 16 bits: ratio 4 at most)",
    "alpt": "stores every row (at 8 or 16 bits, with step sizes)",
    "dpq": "trains a query row per id",
    "mgqe": "trains a query row per id and needs per-id counts",
}


def test_ids_beyond_2_31(name: str) -> None:
    tables = [
        EmbeddingBagConfig(name="huge", num_embeddings=HUGE, embedding_dim=8, feature_names=["big"]),
        EmbeddingBagConfig(name="small", num_embeddings=40, embedding_dim=8, feature_names=["small"]),
    ]
    budget = Budget(bytes=2**25)
    if name in CANNOT_HOLD_HUGE:
        with pytest.raises(ValueError, match=f"'{name}'"):
            build_embedding(name, tables, budget=budget)
        return
    emb = build_embedding(name, tables, budget=budget)
    ids = torch.tensor([2**31 - 1, 2**31, 2**31 + 7, 2**31 + 7 + 2**32, HUGE - 1])
    rows = emb.embeddings("big", ids)
    assert torch.isfinite(rows).all()
    assert not torch.equal(rows[2], rows[3])  # ids 2^32 apart must not alias (an int32 truncation would)
    torch.testing.assert_close(emb.embeddings("big", ids[2:3]), rows[2:3])
    with pytest.raises(ValueError, match="negative id"):
        emb.embeddings("big", torch.tensor([-1]))


def test_every_method_declares_its_tables(name: str) -> None:
    emb = build(name)
    declared = {s.path for s in emb.storage()}
    collections = {n for n, m in emb.named_children() if isinstance(m, EmbeddingBagCollection)}
    assert declared and collections <= declared
    assert sum(s.bytes() for s in emb.storage()) <= emb.training_bytes()  # rows at their declared precision counted
    assert method_class(name).version >= 1


def bags_of_one(ids: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """Bag ``i`` of feature ``f`` holds ``ids[f][i]`` alone; shorter features get empty bags after their ids."""
    batch = max(v.numel() for v in ids.values())
    lengths = [(torch.arange(batch) < v.numel()).long() for v in ids.values()]
    return KeyedJaggedTensor(
        keys=list(ids), values=torch.cat(list(ids.values())), lengths=torch.cat(lengths), stride=batch
    )


def test_remap_id_map_equals_the_per_id_reference(name: str) -> None:
    """Every remap method's vectorized id map, on all ids of every table (and big ids where hashed), in both batch
    layouts (equal ids per feature: the uniform fast path; unequal: the flat one), equals its per-id definition."""
    emb = build(name)
    if not isinstance(emb, RemapMethod):
        pytest.skip(f"{name!r} is not a remap method (it has no id map)")
    ids = {t.feature_names[0]: torch.arange(t.num_embeddings) for t in make_tables()}
    for f in emb.unbounded_features:
        ids[f] = torch.cat([ids[f], torch.tensor([2**31 + 3, 2**40 + 1, 2**62 + 5])])
    most = max(v.numel() for v in ids.values())
    uniform = {f: v.repeat(-(-most // v.numel()))[:most] for f, v in ids.items()}
    for batch in (uniform, ids):
        rows = emb.physical_rows(bags_of_one(batch))
        for f, v in batch.items():
            expected = torch.tensor([emb.reference_rows(f, int(i)) for i in v]).T
            assert torch.equal(rows[f], expected), f

"""The contract every registered method keeps (DESIGN.md): one parametrized test suite over the whole registry."""

from __future__ import annotations

import io

import pytest
import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from recsys_embed.methods import EmbeddingMethod, SparseOptimizer, available_methods, build_embedding
from recsys_embed.methods.fused import fuse_tables
from tests.conftest import budget_for, make_tables, method_options, random_kjt


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


def test_gradients_are_finite(name: str) -> None:
    emb = build(name)
    emb(random_kjt(make_tables(), batch=6)).values().pow(2).sum().backward()
    grads = [p.grad for p in emb.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_memory_is_within_budget_and_equals_stored_tensors(name: str) -> None:
    emb = build(name)
    tables = make_tables()
    assert emb.memory_bytes() <= budget_for(name).max_bytes(tables)
    assert emb.memory_bytes() == stored_bytes(emb)
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


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_loss_decreases_on_a_tiny_task(name: str, fused: bool) -> None:
    """Regress each bag's sum onto a fixed random target; the method must fit it better after training."""
    tables = make_tables((7, 50, 3000), dim=8)
    torch.manual_seed(0)
    emb = build_embedding(name, tables, budget=budget_for(name, 2.0), **method_options(name, tables))
    kjt = random_kjt(tables, batch=64, seed=4, allow_empty=False)
    target = torch.randn(64, sum(t.embedding_dim for t in tables), generator=torch.Generator().manual_seed(5))
    dense_opt = None
    if fused:
        fuse_tables(emb, SparseOptimizer(name="adagrad", lr=0.3))
    else:
        dense_opt = torch.optim.Adagrad(emb.parameters(), lr=0.3)

    def loss() -> torch.Tensor:
        return (emb(kjt).values() - target).pow(2).mean()

    first = loss().item()
    for _ in range(30):
        value = loss()
        value.backward()
        if dense_opt is not None:
            dense_opt.step()
            dense_opt.zero_grad()
    assert loss().item() < 0.7 * first

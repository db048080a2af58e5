"""``hash``: the hash function's definition, parity with a full table, collision statistics, budgets, big ids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods import Budget, build_embedding
from recsys_embed.methods.hash_fn import hash64, hash_to_buckets, reference_hash64
from tests.conftest import make_tables, random_kjt

PINNED_BUCKETS = [727, 657, 641]
PINNED_HASHES = [-2152535657050944081, -7995527694508729151]  # SplitMix64 from state 0, as published


def test_tensor_hash_equals_the_unsigned_reference() -> None:
    ids = torch.tensor([0, 1, 2, 2**31 - 1, 2**31, 2**31 + 5, 2**40 + 3, 2**62, 2**63 - 1])
    for seed in (0, 1, 17, 2**33 + 1):
        assert hash64(ids, seed).tolist() == [reference_hash64(int(i), seed) for i in ids]


def test_hash_values_are_pinned_across_versions() -> None:
    """Fixed outputs: a change here silently re-maps every trained table, so it must be deliberate."""
    assert hash_to_buckets(torch.tensor([0, 1, 2**40]), 0, 1000).tolist() == PINNED_BUCKETS
    assert [reference_hash64(i, 0) for i in (0, 1)] == PINNED_HASHES


def test_parity_with_full_when_rows_cover_the_cardinality() -> None:
    tables = make_tables()
    hashed = build_embedding("hash", tables, rows=max(t.num_embeddings for t in tables))
    full = build_embedding("full", tables)
    full.tables.load_state_dict(hashed.tables.state_dict())
    kjt = random_kjt(tables, batch=8)
    torch.testing.assert_close(hashed(kjt).values(), full(kjt).values())


def test_identity_hash_is_id_modulo_rows() -> None:
    tables = make_tables((100,), dim=2)
    emb = build_embedding("hash", tables, rows=10, hash="identity")
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([3, 13, 99]), lengths=torch.tensor([1, 1, 1]))
    assert emb.remap(kjt).values().tolist() == [3, 3, 9]


def test_collisions_on_a_million_ids_match_theory() -> None:
    """n ids into m buckets: expected occupied buckets m (1 - (1 - 1/m)^n)."""
    n, m = 1_000_000, 100_000
    buckets = hash_to_buckets(torch.arange(n, dtype=torch.int64) + 2**35, 7, m)
    occupied = torch.unique(buckets).numel()
    expected = m * (1 - (1 - 1 / m) ** n)
    assert abs(occupied - expected) < 5 * math.sqrt(expected * (1 - expected / m)) + 50
    counts = torch.bincount(buckets, minlength=m).double()
    assert counts.var().item() == pytest.approx(n / m * (1 - 1 / m), rel=0.05)  # binomial load per bucket


def test_seeds_give_independent_hashes() -> None:
    ids = torch.arange(100_000)
    agree = (hash_to_buckets(ids, 1, 1000) == hash_to_buckets(ids, 2, 1000)).double().mean().item()
    assert agree == pytest.approx(1 / 1000, abs=1e-3)


def test_ids_beyond_the_cardinality_and_2_pow_31_are_hashed_not_rejected() -> None:
    emb = build_embedding("hash", make_tables((1000,), dim=2), rows=10)
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([5_000_000_000, 2**62]), lengths=torch.tensor([1, 1]))
    rows = emb.remap(kjt).values()
    assert rows.min() >= 0 and rows.max() < 10
    assert torch.isfinite(emb(kjt).values()).all()


def test_negative_ids_are_still_rejected() -> None:
    emb = build_embedding("hash", make_tables((1000,), dim=2), rows=10)
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([-3]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="negative id -3"):
        emb(kjt)


def test_budget_solver_takes_the_largest_rows_that_fit() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    budget = Budget(ratio=10)
    emb = build_embedding("hash", tables, budget=budget)
    assert emb.memory_bytes() <= budget.max_bytes(tables)
    bigger = build_embedding("hash", tables, rows=emb.rows + 1)
    assert bigger.memory_bytes() > budget.max_bytes(tables)
    assert emb.compression_ratio() == pytest.approx(10, rel=0.05)


def test_small_tables_stay_full_below_the_row_cap() -> None:
    emb = build_embedding("hash", make_tables((7, 50, 3000)), rows=100)
    assert [t.num_embeddings for t in emb.tables.embedding_bag_configs()] == [7, 50, 100]


def test_shared_table() -> None:
    tables = make_tables((7, 50, 3000), dim=4)
    emb = build_embedding("hash", tables, budget=Budget(ratio=8), shared=True)
    assert [t.num_embeddings for t in emb.tables.embedding_bag_configs()] == [emb.rows]
    assert emb(random_kjt(tables, batch=3)).values().shape == (3, 12)
    kjt = random_kjt(tables, batch=5, max_len=1, allow_empty=False)  # one id per bag
    rows = emb.remap(kjt).values().view(len(tables), 5)  # feature f's rows are the f-th block of bags
    weight = emb.tables.embedding_bags["shared"].weight
    for f, name in enumerate(kjt.keys()):
        torch.testing.assert_close(emb(kjt).to_dict()[name], weight[rows[f]])


def test_unreachable_budget_names_the_smallest() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    with pytest.raises(ValueError, match=r"at least \d+ bytes"):
        build_embedding("hash", tables, budget=Budget(bytes=10))


def test_option_errors() -> None:
    tables = make_tables()
    with pytest.raises(ValueError, match="rows >= 1"):
        build_embedding("hash", tables, rows=0)
    with pytest.raises(ValueError, match=r"hash='md5' \(str\) must be one of 'splitmix64', 'identity'"):
        build_embedding("hash", tables, rows=5, hash="md5")
    with pytest.raises(ValueError, match="either rows= or budget="):
        build_embedding("hash", tables, rows=5, budget=Budget(ratio=2))
    with pytest.raises(ValueError, match="one embedding_dim"):
        mixed = [
            *make_tables((5,), 4),
            EmbeddingBagConfig(name="t9", num_embeddings=6, embedding_dim=8, feature_names=["x"]),
        ]
        build_embedding("hash", mixed, rows=3, shared=True)


def test_fast_hash_equals_the_reference_on_random_big_ids() -> None:
    """The in-place kernel (precomputed seed offsets, per-id seeds and buckets) keeps the published values."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(0, 2**63 - 1, (300,), generator=gen), torch.randint(2**31 - 9, 2**31 + 9, (50,))])
    seeds = torch.randint(0, 2**40, ids.shape, generator=gen)
    buckets = torch.randint(1, 2**31, ids.shape, generator=gen)
    expected = [reference_hash64(int(i), int(s)) & (2**63 - 1) for i, s in zip(ids, seeds)]
    assert hash64(ids, seeds).tolist() == [reference_hash64(int(i), int(s)) for i, s in zip(ids, seeds)]
    assert hash_to_buckets(ids, seeds, buckets).tolist() == [e % int(b) for e, b in zip(expected, buckets)]
    assert hash_to_buckets(ids.int(), 5, 1000).tolist() == [
        reference_hash64(int(i), 5) % 2**63 % 1000 for i in ids.int()
    ]
    two = hash_to_buckets(ids.unsqueeze(0), torch.stack([seeds, seeds + 1]), buckets)  # (k, N) broadcasting
    assert two[0].tolist() == [e % int(b) for e, b in zip(expected, buckets)]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("hash", {"rows": 300}),
        ("multi_hash", {"rows": 300, "num_hashes": 3}),
        ("unified", {"rows": 300}),
        ("adapt", {"rows": 300, "id_counts": {f"f{i}": np.arange(n) % 7 for i, n in enumerate((10, 5000, 70, 2000))}}),
    ],
)
def test_uniform_and_ragged_batches_remap_alike(name: str, options: dict[str, object]) -> None:
    """One id per feature and sample takes the ``(F, L)`` path (hashed features only), a ragged batch the flat one."""
    tables = make_tables((10, 5000, 70, 2000), dim=4)
    emb = build_embedding(name, tables, validate_ids=False, **options)
    keys = [f for t in tables for f in t.feature_names]
    values = torch.cat([torch.randint(0, t.num_embeddings, (6,)) for t in tables])
    values[[7, 20]] = torch.tensor([2**40 + 1, 2**31 + 3])  # big ids on hashed features
    uniform = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.ones(24, dtype=torch.long))
    lengths = torch.ones(24, dtype=torch.long)
    lengths[-1] = 2  # one more id in the last bag: per-feature totals differ, earlier ids keep their positions
    ragged = KeyedJaggedTensor(keys=keys, values=torch.cat([values, torch.tensor([4])]), lengths=lengths)
    rows_uniform, rows_ragged = emb.remap(uniform).values(), emb.remap(ragged).values()
    assert torch.equal(rows_ragged[: rows_uniform.numel()], rows_uniform)

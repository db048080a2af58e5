"""``dhe``: the universal-hash encoding (known answers, int64 safety, determinism), the decoder per unique id, the
budget solver and the option checks. The registry-wide contract (tests/test_method_contract.py) covers the rest."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods import Budget, build_embedding
from recsys_embed.methods.dhe import PRIME, encode, hash_buckets, hash_parameters, reference_buckets
from tests.conftest import make_tables, random_kjt

#: ids around every boundary of the int64 arithmetic: p, 2^31, 2^32, 2^61, 2^62 and the largest int64
EDGE_IDS = [0, 1, 2, 7, PRIME - 1, PRIME, PRIME + 1, 2**31, 2**31 + 7, 2**32, 2**32 + 7, 2 * PRIME, 2 * PRIME + 1]
EDGE_IDS += [2**61 - 1, 2**61, 2**62 - 1, 2**62, 2**62 + 5, 2**63 - 2, 2**63 - 1]


def small_tables() -> list[EmbeddingBagConfig]:
    return make_tables((7, 50, 3000), dim=8)


def test_hash_parameters_are_pinned_and_seeded() -> None:
    """SplitMix64-derived a, b: the same on every machine and version (a changed value changes every embedding)."""
    a, b = hash_parameters(3, seed=0)
    assert a == [
        [60845724, 1294668916, 2046307911],
        [1536941989, 1631396592, 186463879],
        [454736306, 1568727329, 1064126000],
    ]
    assert b == [1667494718, 1371919918, 130874203]
    assert reference_buckets(2**40 + 3, a, b, 10**6) == [71439, 913862, 203271]
    assert reference_buckets(5, a, b, 10**6) == [((a[0][i] * 5 + b[i]) % PRIME) % 10**6 for i in range(3)]
    assert hash_parameters(3, seed=1) != (a, b)
    a, b = hash_parameters(1000, seed=0)
    assert all(1 <= x < PRIME for row in a for x in row) and all(0 <= x < PRIME for x in b)


@pytest.mark.parametrize("buckets", [2, 3, 1000, 10**6, 2**20, 2**20 + 1, PRIME])
def test_hash_buckets_equal_the_python_definition_without_int64_overflow(buckets: int) -> None:
    a, b = hash_parameters(64, seed=3)
    g = torch.Generator().manual_seed(buckets)
    ids = EDGE_IDS + torch.randint(0, 2**62, (200,), generator=g).tolist()
    got = hash_buckets(torch.tensor(ids), torch.tensor(a), torch.tensor(b), buckets)
    expected = torch.tensor([reference_buckets(x, a, b, buckets) for x in ids])
    assert torch.equal(got, expected)
    assert int(got.min()) >= 0 and int(got.max()) < buckets


def test_extreme_hash_parameters_stay_exact() -> None:
    """The largest multipliers, offsets and digits: every product and sum at its bound."""
    a, b = [[PRIME - 1, 1, PRIME - 1]] * 3, [PRIME - 1, 0, PRIME - 1]
    ids = [PRIME - 1, PRIME**2 - 1, 2 * PRIME**2 + PRIME - 1, 2**63 - 1, 0]  # digits (p-1, ...), x2 = 2
    assert max(ids) <= 2**63 - 1
    got = hash_buckets(torch.tensor(ids), torch.tensor(a), torch.tensor(b), 10**6)
    assert torch.equal(got, torch.tensor([reference_buckets(x, a, b, 10**6) for x in ids]))


def test_encoding_is_deterministic_and_distinct_ids_differ() -> None:
    tables = small_tables()
    one, two = (build_embedding("dhe", tables, width=4, num_hashes=64) for _ in range(2))
    assert torch.equal(one.hash_a, two.hash_a) and torch.equal(one.hash_b, two.hash_b)
    other = build_embedding("dhe", tables, width=4, num_hashes=64, seed=1)
    assert not torch.equal(one.hash_a, other.hash_a)
    ids = torch.cat([torch.arange(20_000), torch.tensor([2**31 + 7, 2**31 + 7 + 2**32, 2**62 + 5, 2**63 - 1])])
    code = encode(ids, one.hash_a, one.hash_b, one.buckets, "uniform")
    assert code.shape == (len(ids), 64)
    assert torch.unique(code, dim=0).shape[0] == len(ids)  # no two ids share an encoding
    assert float(code.min()) >= -1.0 and float(code.max()) <= 1.0
    assert abs(float(code.mean())) < 0.01  # uniform on [-1, 1]
    aliases = torch.tensor([7 + PRIME, 7 + PRIME**2, 7 + 2**31, 7 + 2**32])  # what a plain ``x mod p`` would alias
    codes = encode(torch.cat([torch.tensor([7]), aliases]), one.hash_a, one.hash_b, one.buckets, "uniform")
    assert torch.unique(codes, dim=0).shape[0] == 5


def test_gaussian_encoding_is_standard_normal() -> None:
    a, b = hash_parameters(256, seed=0)
    code = encode(torch.arange(4000), torch.tensor(a), torch.tensor(b), 10**6, "gaussian")
    assert code.shape == (4000, 256) and torch.isfinite(code).all()
    assert abs(float(code.mean())) < 0.01 and abs(float(code.std()) - 1.0) < 0.01


def test_decoder_runs_once_per_unique_id() -> None:
    tables = small_tables()
    emb = build_embedding("dhe", tables, width=20, num_hashes=32)
    assert emb.decoded == [False, False, True]  # 7 and 50 rows take fewer bytes than a decoder
    seen: list[int] = []
    emb.decoders["t2"][0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    ids = torch.tensor([5, 5, 9, 5, 2999, 9, 2**40])  # repeated ids across bags and within one
    kjt = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"],
        values=torch.cat([torch.tensor([1, 2]), torch.tensor([3]), ids]),
        lengths=torch.tensor([1, 1, 0, 1, 0, 0, 3, 2, 2]),
        stride=3,
    )
    out = emb(kjt)["f2"]
    assert seen == [4]  # 5, 9, 2999, 2^40: four distinct ids, seven occurrences
    rows = emb.embeddings("f2", torch.tensor([5, 9, 2999, 2**40]))
    torch.testing.assert_close(out, torch.stack([rows[0] * 2 + rows[1], rows[0] + rows[2], rows[1] + rows[3]]))


def test_every_table_decoded_without_keep_small_tables() -> None:
    tables = small_tables()
    emb = build_embedding("dhe", tables, width=3, num_hashes=16, keep_small_tables=False)
    assert emb.decoded == [True, True, True] and emb.tables is None and emb.storage() == []
    params = [16 * 3 + 3 + 3 * 3 + 3 + 3 * 8 + 8] * 3  # k -> 3 -> 3 -> 8, with biases
    assert emb.memory_bytes() == 4 * 16 * 8 + 4 * sum(params)  # 3k multipliers and k offsets
    assert emb.memory_bytes() == sum(t.numel() * t.element_size() for t in emb.state_dict().values())
    out = emb(random_kjt(tables, batch=5))
    assert out.values().shape == (5, 24)
    big = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"], values=torch.tensor([10**12, 7, 2**62]), lengths=torch.ones(3, dtype=torch.long)
    )
    assert torch.isfinite(emb(big).values()).all()  # decoded tables hash any id >= 0


def test_tables_that_keep_rows_still_check_their_ids() -> None:
    emb = build_embedding("dhe", small_tables(), width=20, num_hashes=32)
    ones = torch.ones(3, dtype=torch.long)
    with pytest.raises(ValueError, match="'f0' has id 7"):
        emb(KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([7, 0, 0]), lengths=ones))
    emb(KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([6, 0, 10**9]), lengths=ones))


def test_budget_solver_takes_the_widest_decoder_that_fits() -> None:
    tables = make_tables((10, 2000, 50_000), dim=16)
    budget = Budget(ratio=20)
    emb = build_embedding("dhe", tables, budget=budget, num_hashes=128)
    allowed = budget.max_bytes(tables)
    assert emb.memory_bytes() <= allowed
    wider = build_embedding("dhe", tables, width=emb.width + 1, num_hashes=128)
    assert wider.memory_bytes() > allowed
    assert emb.config()["width"] == emb.width and emb.compression_ratio() >= 20


def test_unreachable_budget_names_the_reachable_ratios() -> None:
    tables = small_tables()
    with pytest.raises(
        ValueError, match=r"Method 'dhe' cannot fit .* reaches ratios 1 to \d+\.\d on these .*fewer num_hashes"
    ):
        build_embedding("dhe", tables, budget=Budget(ratio=50))
    assert build_embedding("dhe", tables, budget=Budget(ratio=50), num_hashes=16).compression_ratio() >= 50


def test_tables_smaller_than_the_hash_parameters_are_one_clear_error() -> None:
    tables = make_tables((10, 12), dim=8)  # 704 bytes in full; 1024 hashes' parameters are 32,768 bytes
    with pytest.raises(ValueError, match=r"cannot compress these tables: .* full tables' 704\. Use fewer"):
        build_embedding("dhe", tables, budget=Budget(ratio=2))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 0}, "width >= 1"),
        ({"width": 4, "num_hashes": 0}, "num_hashes >= 1"),
        ({"width": 4, "buckets": 1}, "2 <= buckets"),
        ({"width": 4, "hidden_layers": 0}, "hidden_layers >= 1"),
        ({"width": 4, "num_hashes": 5, "distribution": "gaussian"}, "even num_hashes"),
        ({"width": 4, "distribution": "normal"}, "must be one of 'uniform', 'gaussian'"),
    ],
)
def test_bad_options_are_clear_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_embedding("dhe", small_tables(), **options)


def test_gaussian_and_deeper_decoders_train() -> None:
    tables = small_tables()
    torch.manual_seed(0)
    emb = build_embedding("dhe", tables, width=16, num_hashes=64, hidden_layers=3, distribution="gaussian")
    kjt = random_kjt(tables, batch=32, seed=4, allow_empty=False)
    target = torch.randn(32, 24, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam(emb.parameters(), lr=1e-2)
    first = (emb(kjt)["f2"] - target[:, 16:]).pow(2).mean().item()
    for _ in range(60):
        loss = (emb(kjt)["f2"] - target[:, 16:]).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.5 * first


def test_all_decoded_gaussian_form_traces_and_exports_on_mixed_tables() -> None:
    """No kept tables, Box-Muller, mixed dims and a table read by two features: fx and export equal eager."""
    from recsys_embed.methods.serving import export_serving, trace_serving
    from tests.test_export import MIXED, mixed_batch

    torch.manual_seed(0)
    options = {"width": 5, "num_hashes": 32, "distribution": "gaussian", "keep_small_tables": False}
    served = build_embedding("dhe", MIXED, **options).to_serving()
    forms = [trace_serving(served), export_serving(served, mixed_batch(MIXED, 4, 3, seed=1)).module()]
    for seed, (size, max_len) in enumerate([(4, 1), (4, 3), (7, 2)], start=40):
        expected = served(mixed_batch(MIXED, size, max_len, seed)).values()
        for form in forms:
            got = form(mixed_batch(MIXED, size, max_len, seed)).values()
            torch.testing.assert_close(got, expected, rtol=0, atol=0)

"""Method-specific tests of the id-remap methods: ``qr``, ``multi_hash``, ``unified``, ``adapt``, ``mde``.

The registry-wide contract (layout, budgets, state dicts, training) lives in ``test_method_contract.py``; here each
method's own definition is checked: parity with ``full`` in its degenerate setting, the remap's arithmetic, hash
statistics, the memory formula by hand, the budget solver's optimality and errors, fused (fbgemm) parity and
ids >= 2^31.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.data import SyntheticConfig
from recsys_embed.methods import Budget, EmbeddingMethod, SparseOptimizer, build_embedding, fuse_tables
from recsys_embed.methods.base import full_bytes
from recsys_embed.methods.mde import MixedDimEmbedding, mde_bytes, mixed_dims, without_wasted_projections
from recsys_embed.methods.multi_hash import MultiHashEmbedding
from recsys_embed.methods.qr import QREmbedding, partition_rows
from recsys_embed.methods.qr_path import QRPathEmbedding, path_bytes
from recsys_embed.methods.unified import BAGS as UNIFIED_BAGS
from recsys_embed.methods.unified import UnifiedEmbedding
from tests.conftest import make_tables, random_kjt, zipf_counts

# ---- helpers ------------------------------------------------------------------------------------------------------


def table(name: str, n: int, dim: int, features: list[str] | None = None) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, num_embeddings=n, embedding_dim=dim, feature_names=features or [f"f_{name}"])


def one_id_per_bag(ids: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """A KJT whose bag ``i`` of feature ``f`` holds ``ids[f][i]`` alone (shorter features get empty bags after)."""
    batch = max(v.numel() for v in ids.values())
    lengths = []
    for v in ids.values():
        lens = torch.zeros(batch, dtype=torch.int64)
        lens[: v.numel()] = 1
        lengths.append(lens)
    values = torch.cat([v.to(torch.int64) for v in ids.values()])
    return KeyedJaggedTensor(keys=list(ids), values=values, lengths=torch.cat(lengths), stride=batch)


def all_features_kjt(
    tables: list[EmbeddingBagConfig], batch: int, *, max_len: int = 3, seed: int = 0
) -> KeyedJaggedTensor:
    """Like ``random_kjt`` but over every feature of every table (tables may read several features)."""
    g = torch.Generator().manual_seed(seed)
    keys, lengths, values = [], [], []
    for t in tables:
        for f in t.feature_names:
            lens = torch.randint(0, max_len + 1, (batch,), generator=g)
            keys.append(f)
            lengths.append(lens)
            values.append(torch.randint(0, t.num_embeddings, (int(lens.sum()),), generator=g))
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=batch)


def physical_ids(emb: EmbeddingMethod, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    """Physical key -> its remapped rows (in the input's id order): ``f@c`` for copy ``c`` of feature ``f`` when some
    feature has several copies, else ``f``."""
    rows = emb.physical_rows(kjt)  # type: ignore[attr-defined]
    if max(r.shape[0] for r in rows.values()) == 1:
        return {f: r[0] for f, r in rows.items()}
    return {f"{f}@{c}": r[c] for f, r in rows.items() for c in range(r.shape[0])}


def weight(emb: EmbeddingMethod, table_name: str) -> torch.Tensor:
    return emb.tables.embedding_bags[table_name].weight  # type: ignore[union-attr]


def parameter_bytes(emb: EmbeddingMethod) -> int:
    return sum(p.numel() * p.element_size() for p in emb.parameters())


def smallest_bytes_in(message: str) -> int:
    found = re.search(r"at least (\d+) bytes", message)
    assert found, message
    return int(found.group(1))


# ---- qr -----------------------------------------------------------------------------------------------------------

QR_TABLES = (7, 50, 300)


@pytest.mark.parametrize("partitions", [2, 3])
@pytest.mark.parametrize("operation", ["mult", "add"])
def test_qr_equals_full_with_one_collision(operation: str, partitions: int) -> None:
    """collisions=1: partitions 0..k-2 have one row each (index c); the quotient rows k-1+id are a full table.

    ``mult`` pools each partition before multiplying (as the authors' DLRM ``QREmbeddingBag``), so a bag of L ids
    gives ``L * sum(rows)``: parity holds for bags of at most one id. ``add`` is exact for any bag.
    """
    tables = make_tables(QR_TABLES, dim=8)
    torch.manual_seed(0)
    qr = build_embedding("qr", tables, collisions=1, partitions=partitions, operation=operation)
    full = build_embedding("full", tables)
    k = partitions
    with torch.no_grad():
        for t in tables:
            w = weight(qr, t.name)
            assert w.shape == (t.num_embeddings + k - 1, t.embedding_dim)
            w[: k - 1] = 1.0 if operation == "mult" else 0.0
            w[k - 1 :] = weight(full, t.name)
    kjt = random_kjt(tables, batch=32, max_len=1 if operation == "mult" else 4, seed=3)
    torch.testing.assert_close(qr(kjt).values(), full(kjt).values())


def test_qr_mult_pools_partitions_before_multiplying() -> None:
    """Pinned design: a 2-id bag under ``mult`` with unit remainders gives (1 + 1) * (row_a + row_b)."""
    tables = make_tables((10,), dim=4)
    qr = build_embedding("qr", tables, collisions=1, operation="mult")
    with torch.no_grad():
        weight(qr, "t0")[0] = 1.0
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([3, 5]), lengths=torch.tensor([2]))
    rows = weight(qr, "t0").detach()
    torch.testing.assert_close(qr(kjt).values()[0], 2 * (rows[1 + 3] + rows[1 + 5]))


@pytest.mark.parametrize("partitions", [2, 3])
def test_qr_mult_output_and_gradients_equal_the_pooled_product_by_hand(partitions: int) -> None:
    """Bags of several ids, tables of two dims: each partition's rows pooled over the bag, then multiplied; the
    table's gradient equals autograd's through that definition."""
    tables = [table("a", 7, 4, ["f0"]), table("b", 50, 8, ["f1", "f2"]), table("c", 300, 8, ["f3"])]
    torch.manual_seed(0)
    qr = build_embedding("qr", tables, collisions=[2, 3, 5], partitions=partitions, operation="mult")
    kjt = all_features_kjt(tables, batch=6, max_len=4, seed=2)
    out = qr(kjt).to_dict()
    grads = {f: torch.randn_like(v) for f, v in out.items()}
    sum((out[f] * grads[f]).sum() for f in out).backward()

    rows = physical_ids(qr, kjt)
    reference = {t.name: weight(qr, t.name).detach().clone().requires_grad_() for t in tables}
    total = torch.zeros(())
    for t in tables:
        for f in t.feature_names:
            bags = kjt[f].lengths().tolist()
            parts = [torch.split(reference[t.name][rows[f"{f}@{c}"]], bags) for c in range(partitions)]
            for b in range(len(bags)):
                expected = math.prod(parts[c][b].sum(0) for c in range(partitions))
                torch.testing.assert_close(out[f][b], expected.detach())
                total = total + (expected * grads[f][b]).sum()
    total.backward()
    for t in tables:
        torch.testing.assert_close(weight(qr, t.name).grad, reference[t.name].grad)


@pytest.mark.parametrize(("partitions", "base"), [(2, 100), (2, 7), (3, 22), (3, 5)])
def test_qr_partitions_are_complementary(partitions: int, base: int) -> None:
    """Every id of a 10_000-id table gets a unique tuple of partition rows, each inside its partition's block."""
    n, k = 10_000, partitions
    qr = build_embedding("qr", make_tables((n,), dim=4), collisions=base, partitions=k)
    ids = torch.arange(n)
    rows = physical_ids(qr, one_id_per_bag({"f0": ids}))
    parts = torch.stack([rows[f"f0@{c}"] for c in range(k)])
    assert parts.shape == (k, n)
    for c in range(k - 1):
        assert parts[c].min() >= c * base and parts[c].max() < (c + 1) * base
    quotient_rows = math.ceil(n / base ** (k - 1))
    assert parts[-1].min() == (k - 1) * base and parts[-1].max() == (k - 1) * base + quotient_rows - 1
    assert parts[-1].max() < weight(qr, "t0").shape[0]
    assert torch.unique(parts, dim=1).shape[1] == n


def test_qr_integer_division_is_exact_for_big_ids() -> None:
    """Mixed-radix digits of ids near 2^40 (forward path, validated) and near 2^62 (remap only) equal Python's."""
    n, base = 2**41, 2**14 + 3  # k = 3: 2 * base + ceil(2^41 / base^2) ~ 41k rows
    qr = build_embedding("qr", make_tables((n,), dim=4), collisions=base, partitions=3)
    ids = [2**40 + d for d in range(-3, 4)] + [2**41 - 1, base**2 - 1, base**2]
    rows = physical_ids(qr, one_id_per_bag({"f0": torch.tensor(ids)}))
    assert rows["f0@0"].tolist() == [i % base for i in ids]
    assert rows["f0@1"].tolist() == [base + (i // base) % base for i in ids]
    assert rows["f0@2"].tolist() == [2 * base + i // base**2 for i in ids]
    assert torch.isfinite(qr(one_id_per_bag({"f0": torch.tensor(ids)})).values()).all()

    small = build_embedding("qr", make_tables((100,), dim=4), collisions=1_000_003, partitions=2)
    huge = [2**62 + 12345, 2**63 - 1, 2**53 + 1]  # above 2^53 a float division would round
    rows = physical_ids(small, one_id_per_bag({"f0": torch.tensor(huge)}))
    assert rows["f0@0"].tolist() == [i % 1_000_003 for i in huge]
    assert rows["f0@1"].tolist() == [1_000_003 + i // 1_000_003 for i in huge]


@pytest.mark.parametrize(("operation", "partitions"), [("mult", 2), ("mult", 3), ("add", 2), ("add", 3)])
def test_qr_initial_scale_matches_a_full_table(operation: str, partitions: int) -> None:
    """A full table starts uniform in +-sqrt(1/n), std sqrt(1/(3n)); the combined QR vectors keep that scale."""
    n = 10_000
    torch.manual_seed(0)
    qr = build_embedding("qr", make_tables((n,), dim=16), collisions=10, partitions=partitions, operation=operation)
    with torch.no_grad():
        out = qr(one_id_per_bag({"f0": torch.arange(n)})).values()
    ratio = out.std().item() / math.sqrt(1.0 / (3 * n))
    assert 0.8 < ratio < 1.25  # the doc's promise; a missing 1/sqrt(k) would give sqrt(k), a wrong range >> 1


@pytest.mark.parametrize(
    ("operation", "partitions", "dim", "expected"),
    [
        ("mult", 2, 8, (3 + 34) * 8 * 4),  # n=100, b=3: 3 remainder rows + ceil(100/3) quotient rows
        ("add", 2, 8, (3 + 34) * 8 * 4),
        ("concat", 2, 8, (3 + 34) * 4 * 4),  # each partition d/k wide
        ("mult", 3, 8, (2 * 3 + 12) * 8 * 4),  # 2 digit partitions + ceil(100/9)
        ("add", 3, 8, (2 * 3 + 12) * 8 * 4),
        ("concat", 3, 12, (2 * 3 + 12) * 4 * 4),
    ],
)
def test_qr_memory_by_hand(operation: str, partitions: int, dim: int, expected: int) -> None:
    qr = build_embedding("qr", make_tables((100,), dim=dim), collisions=3, partitions=partitions, operation=operation)
    assert qr.memory_bytes() == expected == parameter_bytes(qr)


def test_qr_memory_by_hand_with_per_table_collisions() -> None:
    qr = build_embedding("qr", make_tables((100, 40), dim=8), collisions=[3, 5])
    assert qr.memory_bytes() == ((3 + 34) + (5 + 8)) * 8 * 4 == parameter_bytes(qr)


@pytest.mark.parametrize(("partitions", "ratio"), [(2, 2), (2, 4), (2, 10), (2, 50), (3, 10), (3, 100), (3, 500)])
def test_qr_budget_solver_takes_the_fewest_collisions_that_fit(partitions: int, ratio: float) -> None:
    """One table: memory fits, one collision less would not fit.

    Tolerance: the reachable ratios are discrete (for k = 2 about ``b``, so the ratio reached is below
    ``asked + 1.05``; for k = 3 a step of the base changes the quotient rows by ~(b / (b-1))^2, so only the
    optimality of ``b`` is asserted).
    """
    tables = make_tables((100_000,), dim=16)
    budget = Budget(ratio=ratio)
    qr = build_embedding("qr", tables, budget=budget, partitions=partitions)
    assert qr.memory_bytes() <= budget.max_bytes(tables)
    assert qr.compression_ratio() >= ratio
    base = qr.bases[0]
    assert base > 1
    assert QREmbedding.table_bytes(tables, [base - 1], partitions, "mult") > budget.max_bytes(tables)
    if partitions == 2:
        assert qr.compression_ratio() < ratio + 1.05


def test_qr_budget_solver_on_several_tables() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    for ratio in (2.0, 4.0, 10.0):
        qr = build_embedding("qr", tables, budget=Budget(ratio=ratio))
        assert qr.memory_bytes() <= Budget(ratio=ratio).max_bytes(tables)
        assert ratio <= qr.compression_ratio() < 1.5 * ratio


def test_qr_concat_budget_counts_narrow_partitions() -> None:
    tables = make_tables((100_000,), dim=16)
    qr = build_embedding("qr", tables, budget=Budget(ratio=20), operation="concat")
    assert qr.memory_bytes() <= Budget(ratio=20).max_bytes(tables)
    assert QREmbedding.table_bytes(tables, [qr.bases[0] - 1], 2, "concat") > Budget(ratio=20).max_bytes(tables)


def test_qr_unreachable_budget_names_the_smallest_reachable_bytes() -> None:
    tables = make_tables((100_000,), dim=16)
    with pytest.raises(ValueError, match=r"partitions=2 cannot fit.*at least \d+ bytes") as info:
        build_embedding("qr", tables, budget=Budget(bytes=1000), partitions=2)
    smallest = smallest_bytes_in(str(info.value))
    assert smallest == min(partition_rows(100_000, b, 2) for b in range(1, 400)) * 16 * 4
    assert "another method" in str(info.value) and "partitions=3" not in str(info.value)  # 3 would not fit either
    fits = build_embedding("qr", tables, budget=Budget(bytes=smallest), partitions=2)
    assert fits.memory_bytes() == smallest
    with pytest.raises(ValueError, match=f"at least {smallest} bytes"):
        build_embedding("qr", tables, budget=Budget(bytes=smallest - 1), partitions=2)


def test_qr_fixed_partitions_error_suggests_the_partitions_that_fit() -> None:
    tables = make_tables((100_000,), dim=16)
    two = min(partition_rows(100_000, b, 2) for b in range(1, 400)) * 16 * 4
    with pytest.raises(ValueError, match=r"use partitions=3 \(reaches \d+ bytes\) or leave partitions unset"):
        build_embedding("qr", tables, budget=Budget(bytes=two - 64), partitions=2)


def test_qr_without_partitions_takes_more_partitions_below_the_two_partition_ceiling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tables = make_tables((7, 50, 3000, 100_000), dim=16)
    two = sum(min(partition_rows(t.num_embeddings, b, 2) for b in range(1, 400)) for t in tables) * 16 * 4
    assert build_embedding("qr", tables, budget=Budget(bytes=two)).partitions == 2
    with caplog.at_level("INFO", logger="recsys_embed.methods.qr"):
        qr = build_embedding("qr", tables, budget=Budget(bytes=two - 1))
    assert qr.partitions == 3 and qr.memory_bytes() <= two - 1
    assert "using 3 partitions" in caplog.text
    # the true ceiling: the fewest bytes over every partition count, named by the error and reachable exactly
    with pytest.raises(ValueError, match=r"with partitions=\d+\)\. Ask for at least \d+ bytes") as info:
        build_embedding("qr", tables, budget=Budget(bytes=100))
    smallest = smallest_bytes_in(str(info.value))
    best = min(
        sum(min(partition_rows(t.num_embeddings, b, k) for b in range(1, 400)) for t in tables) * 16 * 4
        for k in range(2, 20)
    )
    assert smallest == best
    assert build_embedding("qr", tables, budget=Budget(bytes=smallest)).memory_bytes() == smallest


@pytest.mark.parametrize("n", [36, 198_476])  # sizes whose fewest rows sit below the k-th root of n
def test_qr_budget_solver_with_three_partitions_works_for_every_size(n: int) -> None:
    tables = make_tables((n,), dim=8)
    qr = build_embedding("qr", tables, budget=Budget(ratio=1.5), partitions=3)
    assert qr.memory_bytes() <= Budget(ratio=1.5).max_bytes(tables)


def test_qr_three_partitions_on_a_tiny_table_names_the_smallest_budget() -> None:
    tables = make_tables((10,), dim=8)  # fewest rows: base 2 -> 2 + 2 + 3 = 7 rows = 224 bytes
    with pytest.raises(ValueError, match="at least 224 bytes"):
        build_embedding("qr", tables, budget=Budget(ratio=1.5), partitions=3)
    assert build_embedding("qr", tables, budget=Budget(bytes=224), partitions=3).memory_bytes() == 224


def test_qr_named_smallest_budget_is_really_the_smallest() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    with pytest.raises(ValueError, match=r"at least \d+ bytes") as info:
        build_embedding("qr", tables, budget=Budget(bytes=10), partitions=2)
    smaller = build_embedding("qr", tables, collisions=[3, 7, 55])  # each table's own fewest rows
    assert smallest_bytes_in(str(info.value)) == smaller.memory_bytes()
    assert build_embedding("qr", tables, budget=Budget(bytes=smaller.memory_bytes()), partitions=2).memory_bytes() == (
        smaller.memory_bytes()
    )


def brute_force_cheapest(cards: tuple[int, ...], cost: Callable[[int, int], int], top: int) -> int:
    """The fewest total bytes over every choice of per-table bases in ``1..top``."""
    return min(
        sum(cost(n, b) for n, b in zip(cards, bases))
        for bases in itertools.product(range(1, top + 1), repeat=len(cards))
    )


def check_against_brute_force(
    name: str, cards: tuple[int, ...], dim: int, cost: Callable[[int, int], int], options: dict[str, object]
) -> None:
    """At every budget (one row apart) from below the brute-force minimum up to the full tables: the solver fits iff
    some choice of bases fits (the error names that minimum), and its result is the uniform byte cap's: every table
    takes the fewest collisions under the largest per-table cap whose total fits (a cap one step higher does not)."""
    tables = make_tables(cards, dim=dim)
    floor = brute_force_cheapest(cards, cost, max(cards) + 1)
    options_of = [[cost(n, b) for b in range(1, n + 2)] for n in cards]  # each table's bytes at base 1, 2, ...
    for allowed in range(floor - 3 * dim * 4, full_bytes(tables) + 1, dim * 4):
        if allowed < floor:
            with pytest.raises(ValueError, match=f"at least {floor} bytes"):
                build_embedding(name, tables, budget=Budget(bytes=allowed), **options)
            continue
        emb = build_embedding(name, tables, budget=Budget(bytes=allowed), **options)
        assert emb.memory_bytes() <= allowed
        got = [cost(n, b) for n, b in zip(cards, emb.bases)]  # type: ignore[attr-defined]
        assert got == uniform_cap_choice(options_of, allowed), (allowed, emb.bases)  # type: ignore[attr-defined]


def uniform_cap_choice(options_of: list[list[int]], allowed: int) -> list[int]:
    """Bytes per table under the largest common cap that fits, by trying every cap that changes a choice."""

    def under(limit: int) -> list[int]:  # each table: its fewest collisions with bytes <= limit, else fewest bytes
        return [next((c for c in table if c <= limit), min(table)) for table in options_of]

    caps = sorted({c for table in options_of for c in table} | {0})
    return under(max(cap for cap in caps if sum(under(cap)) <= allowed))


@pytest.mark.parametrize("partitions", [2, 3])
def test_qr_budget_solver_matches_a_brute_force_search(partitions: int) -> None:
    def cost(n: int, b: int) -> int:
        return partition_rows(n, b, partitions) * 4 * 4

    check_against_brute_force("qr", (3, 11, 40), 4, cost, {"partitions": partitions})


def test_qr_path_budget_solver_matches_a_brute_force_search() -> None:
    check_against_brute_force("qr_path", (5, 30, 90), 4, lambda n, b: path_bytes(n, 4, b), {})


def test_qr_budget_solver_keeps_small_tables_full() -> None:
    """Under one byte cap, a small (frequent) table stays uncompressed while the large ones share the compression."""
    tables = make_tables((7, 50, 3000, 40_000), dim=8)
    for ratio in (3.0, 10.0, 30.0):
        qr = build_embedding("qr", tables, budget=Budget(ratio=ratio), partitions=2)
        assert qr.memory_bytes() <= Budget(ratio=ratio).max_bytes(tables)
        assert qr.bases[0] == 1 and qr.bases[1] == 1 and qr.bases[3] > qr.bases[2] >= 1, (ratio, qr.bases)


def test_qr_solvers_are_fast_on_the_default_synthetic_tables() -> None:
    tables = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=16, feature_names=[f"f{i}"])
        for i, n in enumerate(SyntheticConfig().cardinalities())
    ]
    start = time.perf_counter()
    for cls in (QREmbedding, QRPathEmbedding, MixedDimEmbedding):
        with pytest.raises(ValueError, match="at least"):
            cls.from_budget(tables, Budget(bytes=1))
    assert time.perf_counter() - start < 20.0  # a guard against a solver that walks every id (speed: benchmarks)


def test_qr_option_errors() -> None:
    with pytest.raises(ValueError, match=r"divisible by 4 \* partitions = 12"):
        build_embedding("qr", make_tables((100,), dim=8), partitions=3, operation="concat")
    with pytest.raises(ValueError, match=r"divisible by 4 \* partitions = 8"):
        build_embedding("qr", make_tables((100,), dim=4), operation="concat")
    with pytest.raises(ValueError, match="partitions >= 2"):
        build_embedding("qr", make_tables((100,), dim=8), partitions=1)
    with pytest.raises(ValueError, match=r"operation='max' \(str\) must be one of 'mult', 'add', 'concat'"):
        build_embedding("qr", make_tables((100,), dim=8), operation="max")
    with pytest.raises(ValueError, match="collisions must be >= 1"):
        build_embedding("qr", make_tables((100,), dim=8), collisions=0)
    with pytest.raises(ValueError, match="one per table"):
        build_embedding("qr", make_tables((100, 50), dim=8), collisions=[2, 3, 4])
    with pytest.raises(ValueError, match="either collisions= or budget="):
        build_embedding("qr", make_tables((100,), dim=8), collisions=2, budget=Budget(ratio=2))


# ---- multi_hash ---------------------------------------------------------------------------------------------------

MILLION, M_ROWS = 1_000_000, 100_000


@pytest.fixture(scope="module")
def million_rows() -> torch.Tensor:
    """Rows of k=2 hashes for 10^6 consecutive ids of one table folded onto 10^5 rows: shape (2, 10^6)."""
    emb = build_embedding("multi_hash", make_tables((MILLION,), dim=4), rows=M_ROWS, num_hashes=2)
    rows = physical_ids(emb, one_id_per_bag({"f0": torch.arange(MILLION)}))
    return torch.stack([rows["f0@0"], rows["f0@1"]])


def _colliding_pairs(keys: torch.Tensor) -> int:
    counts = torch.unique(keys, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def test_multi_hash_signature_collisions_match_theory(million_rows: torch.Tensor) -> None:
    """n ids, k=2 hashes into m rows: about n^2 / (2 m^2) = 50 pairs share both rows; one hash: nearly all ids."""
    n, m = MILLION, M_ROWS
    expected_pairs = n * (n - 1) / (2 * m**2)
    pairs = _colliding_pairs(million_rows[0] * m + million_rows[1])
    assert abs(pairs - expected_pairs) < 5 * math.sqrt(expected_pairs)
    signature_colliding = 1.0 - torch.unique(million_rows[0] * m + million_rows[1]).numel() / n
    bucket_counts = torch.bincount(million_rows[0], minlength=m)
    single_colliding = (bucket_counts[million_rows[0]] > 1).double().mean().item()
    assert single_colliding > 0.99  # expected 1 - e^-10
    assert signature_colliding < 5e-4 and signature_colliding < single_colliding / 1000


@pytest.mark.parametrize("copy", [0, 1])
def test_multi_hash_each_hash_is_uniform(million_rows: torch.Tensor, copy: int) -> None:
    """Bucket loads are binomial: mean n/m, variance n/m (1 - 1/m); all rows in range."""
    rows = million_rows[copy]
    assert rows.min() >= 0 and rows.max() < M_ROWS
    counts = torch.bincount(rows, minlength=M_ROWS).double()
    assert counts.var().item() == pytest.approx(MILLION / M_ROWS * (1 - 1 / M_ROWS), rel=0.05)


def test_multi_hash_seeds_are_independent(million_rows: torch.Tensor) -> None:
    """The two hashes of one id agree with probability 1/m; on a small table too (and across features)."""
    agree = int((million_rows[0] == million_rows[1]).sum())
    assert abs(agree - MILLION / M_ROWS) < 5 * math.sqrt(MILLION / M_ROWS)

    m, n = 101, 30_000
    tables = [table("a", n, 4, ["x"]), table("b", n, 4, ["y"])]
    emb = build_embedding("multi_hash", tables, rows=m, num_hashes=3)
    ids = torch.arange(n) * 7919 + 2**33
    rows = physical_ids(emb, one_id_per_bag({"x": ids, "y": ids}))
    keys = ["x@0", "x@1", "x@2", "y@0", "y@1", "y@2"]
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            rate = (rows[a] == rows[b]).double().mean().item()
            assert rate == pytest.approx(1 / m, abs=5 * math.sqrt(1 / (m * n)))


def test_multi_hash_small_tables_stay_full_and_unhashed() -> None:
    tables = make_tables((7, 50, 3000), dim=4)
    emb = build_embedding("multi_hash", tables, rows=100, num_hashes=3)
    assert emb.executor.copies == [1, 1, 3]
    assert [t.num_embeddings for t in emb.tables.embedding_bag_configs()] == [7, 50, 100]
    kjt = one_id_per_bag({"f0": torch.arange(7), "f1": torch.arange(50), "f2": torch.arange(3000)})
    rows = physical_ids(emb, kjt)
    assert rows["f0@0"].tolist() == list(range(7)) and rows["f1@0"].tolist() == list(range(50))
    assert not {f"f{i}@{c}" for i in (0, 1) for c in (1, 2)} & set(rows)  # full tables: one row per id
    assert all(rows[f"f2@{c}"].max() < 100 for c in range(3))
    assert emb.memory_bytes() == (7 + 50 + 100) * 4 * 4 + 8 * 3 * 3


def test_multi_hash_initial_sum_has_a_full_tables_scale() -> None:
    n = 3000
    torch.manual_seed(0)
    emb = build_embedding("multi_hash", make_tables((n,), dim=16), rows=1000, num_hashes=4)
    with torch.no_grad():
        out = emb(one_id_per_bag({"f0": torch.arange(n)})).values()
    assert out.std().item() / math.sqrt(1.0 / (3 * n)) == pytest.approx(1.0, rel=0.2)


@pytest.mark.parametrize("num_hashes", [2, 3])
def test_multi_hash_budget_solver_takes_the_largest_rows(num_hashes: int) -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    budget = Budget(ratio=10)
    emb = build_embedding("multi_hash", tables, budget=budget, num_hashes=num_hashes)
    allowed = budget.max_bytes(tables)
    assert emb.memory_bytes() <= allowed
    assert MultiHashEmbedding.rows_bytes(tables, emb.rows + 1, num_hashes) > allowed
    with pytest.raises(ValueError, match=r"at least \d+ bytes"):
        build_embedding("multi_hash", tables, budget=Budget(bytes=100), num_hashes=num_hashes)


# ---- unified ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [300, 317])
def test_unified_identity_equals_full(rows: int) -> None:
    tables = make_tables((300,), dim=8)
    torch.manual_seed(0)
    uni = build_embedding("unified", tables, rows=rows, chunk_dim=8, hash="identity")
    full = build_embedding("full", tables)
    with torch.no_grad():
        weight(uni, "unified")[:300] = weight(full, "t0")
    kjt = random_kjt(tables, batch=16, max_len=4, seed=2)
    torch.testing.assert_close(uni(kjt).values(), full(kjt).values())


def test_unified_multi_probe_and_mixed_dims_share_one_table() -> None:
    tables = [table("a", 50, 8, ["f0"]), table("b", 3000, 16, ["f1"])]
    uni = build_embedding("unified", tables, rows=500, chunk_dim=8)
    physical = uni.tables.embedding_bag_configs()
    assert len(physical) == 1
    assert (physical[0].num_embeddings, physical[0].embedding_dim) == (500, 8)
    assert physical[0].feature_names == [UNIFIED_BAGS]  # one feature reads it: fbgemm's fast backward
    assert uni.executor.rewrite.keys == ["f0@0", "f0@1", "f1@0", "f1@1"]  # as blocks of bags of that feature
    ids = {"f0": torch.arange(50), "f1": torch.arange(3000)}
    rows = physical_ids(uni, one_id_per_bag(ids))
    assert "f0@1" not in rows  # f0 has one chunk: its second slot is muted
    assert (rows["f1@0"] == rows["f1@1"]).double().mean().item() < 0.01  # ~1/500: the chunks probe different rows
    out = uni(one_id_per_bag(ids))
    assert out.length_per_key() == [8, 16]
    w = weight(uni, "unified").detach()
    torch.testing.assert_close(out.to_dict()["f1"], torch.cat([w[rows["f1@0"]], w[rows["f1@1"]]], dim=1))
    torch.testing.assert_close(out.to_dict()["f0"][:50], w[rows["f0@0"]])


def test_unified_identity_with_enough_rows_is_collision_free() -> None:
    tables = [table("a", 7, 8, ["f0"]), table("b", 50, 8, ["f1", "f2"]), table("c", 300, 8, ["f3"])]
    uni = build_embedding("unified", tables, rows=7 + 50 + 300, hash="identity")
    ids = {"f0": torch.arange(7), "f1": torch.arange(50), "f2": torch.arange(50), "f3": torch.arange(300)}
    per_feature = physical_ids(uni, one_id_per_bag(ids))
    rows = torch.cat([per_feature[f] for f in ("f0", "f1", "f3")])
    assert rows.numel() == 357 and torch.unique(rows).numel() == 357 and rows.max() < 357
    assert torch.equal(per_feature["f1"], per_feature["f2"])  # one table: its features read the same rows


def test_unified_identity_mixed_dims_needs_only_the_rows_it_reads() -> None:
    tables = [table("a", 100, 8, ["f0"]), table("b", 10, 16, ["f1"])]
    uni = build_embedding("unified", tables, rows=100 * 1 + 10 * 2, chunk_dim=8, hash="identity")
    rows = torch.cat(
        list(physical_ids(uni, one_id_per_bag({"f0": torch.arange(100), "f1": torch.arange(10)})).values())
    )
    assert torch.unique(rows).numel() == rows.numel() == 120


def test_unified_memory_formula() -> None:
    uni = build_embedding("unified", make_tables((7, 50, 3000), dim=16), rows=123, chunk_dim=8)
    assert uni.memory_bytes() == 123 * 8 * 4 + 8 * 3 * 2


def test_unified_memory_counts_a_seed_per_table_and_chunk_slot_with_mixed_dims() -> None:
    tables = [table("a", 100, 8, ["f0"]), table("b", 10, 16, ["f1"])]
    uni = build_embedding("unified", tables, rows=120, chunk_dim=8)
    assert uni.memory_bytes() == 120 * 8 * 4 + 8 * 2 * 2  # 2 tables x max 2 chunks, as documented


@pytest.mark.parametrize("chunk_dim", [None, 4, 8])
def test_unified_budget_solver_takes_the_largest_rows(chunk_dim: int | None) -> None:
    tables = [table("a", 50, 8, ["f0"]), table("b", 3000, 16, ["f1"])]
    budget = Budget(ratio=10)
    uni = build_embedding("unified", tables, budget=budget, chunk_dim=chunk_dim)
    allowed = budget.max_bytes(tables)
    assert uni.memory_bytes() <= allowed
    assert UnifiedEmbedding.rows_bytes(uni.rows + 1, uni.chunk_dim, uni.seeds.numel()) > allowed
    assert uni.compression_ratio() == pytest.approx(10, rel=0.01)
    with pytest.raises(ValueError, match=r"at least \d+ bytes"):
        build_embedding("unified", tables, budget=Budget(bytes=40), chunk_dim=chunk_dim)


def test_unified_chunk_dim_errors() -> None:
    with pytest.raises(ValueError, match="chunk_dim a multiple of 4"):
        build_embedding("unified", make_tables((10,), dim=12), rows=5, chunk_dim=6)
    with pytest.raises(ValueError, match="every embedding_dim divisible by chunk_dim"):
        build_embedding("unified", make_tables((10,), dim=12), rows=5, chunk_dim=8)
    with pytest.raises(ValueError, match=r"chunk_dim=3"):  # the default gcd of dims 6 and 9
        build_embedding("unified", [table("a", 10, 6), table("b", 10, 9)], rows=5)
    with pytest.raises(ValueError, match=r"hash='md5' \(str\) must be one of 'splitmix64', 'identity'"):
        build_embedding("unified", make_tables((10,), dim=8), rows=5, hash="md5")


# ---- adapt --------------------------------------------------------------------------------------------------------


def _adapt_tables() -> list[EmbeddingBagConfig]:
    return [table("t0", 2000, 4, ["a", "b"]), table("t1", 1500, 4, ["c"]), table("t2", 50, 4, ["d"])]


def _distinct_counts(tables: list[EmbeddingBagConfig]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f: rng.permutation(t.num_embeddings).astype(np.int64) * 3 + 1 for t in tables for f in t.feature_names}


def test_adapt_hot_ids_get_their_own_rows_cold_ids_the_rest() -> None:
    tables, rows, hot = _adapt_tables(), 200, 100
    counts = _distinct_counts(tables)
    emb = build_embedding("adapt", tables, rows=rows, hot_share=0.5, id_counts=counts)
    ids = {f: torch.arange(t.num_embeddings) for t in tables for f in t.feature_names}
    got = physical_ids(emb, one_id_per_bag(ids))
    for t in tables[:2]:
        freq = sum(counts[f] for f in t.feature_names)  # a table's features add their counts
        is_hot = torch.zeros(t.num_embeddings, dtype=torch.bool)
        is_hot[torch.from_numpy(np.argsort(-freq, kind="stable")[:hot])] = True
        for f in t.feature_names:
            r = got[f]
            assert r[is_hot].max() < hot and torch.unique(r[is_hot]).numel() == hot
            assert r[~is_hot].min() >= hot and r[~is_hot].max() < rows
        assert torch.equal(got[t.feature_names[0]][is_hot], got[t.feature_names[-1]][is_hot])  # shared hot rows
    assert got["d"].tolist() == list(range(50))  # n <= rows: ids are rows


def test_adapt_hot_ties_go_to_the_smaller_id() -> None:
    tables = [table("t0", 100, 4, ["a"])]
    counts = np.ones(100, dtype=np.int64)
    counts[[90, 91]] = 5
    emb = build_embedding("adapt", tables, rows=10, hot_share=0.5, id_counts={"a": counts})  # 5 hot rows
    assert emb.hot_keys.tolist() == [0, 1, 2, 90, 91]


def test_adapt_id_counts_errors() -> None:
    tables = _adapt_tables()
    with pytest.raises(ValueError, match="needs id_counts"):
        build_embedding("adapt", tables, rows=200)
    counts = _distinct_counts(tables)
    counts["c"] = counts["c"][:-1]
    with pytest.raises(ValueError, match=r"id_counts\['c'\] must have 1500 entries \(got 1499\)"):
        build_embedding("adapt", tables, rows=200, id_counts=counts)
    del counts["b"]
    with pytest.raises(ValueError, match=r"id_counts\['b'\] must have 2000 entries \(got none\)"):
        build_embedding("adapt", tables, rows=200, id_counts=counts)
    emb = build_embedding("adapt", tables, rows=5000)  # every table full: no counts needed
    assert emb.hot_keys.numel() == 0


def test_adapt_memory_by_hand() -> None:
    emb = build_embedding(
        "adapt", _adapt_tables(), rows=200, hot_share=0.5, id_counts=_distinct_counts(_adapt_tables())
    )
    # t0: 200 rows, 100 hot ids; t1: 200 rows, 100 hot ids; t2: full 50 rows; one int64 seed per table
    expected = (200 * 4 * 4 + 8 + 8 * 100) + (200 * 4 * 4 + 8 + 8 * 100) + (50 * 4 * 4 + 8)
    assert emb.memory_bytes() == expected


def test_adapt_has_fewer_colliding_lookups_than_hash_on_zipf_traffic() -> None:
    """Same budget; a lookup collides when its row is shared with another id seen in the stream."""
    n = 20_000
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, n + 1) ** 1.05
    stream = rng.permutation(n)[rng.choice(n, size=200_000, p=p / p.sum())]
    counts = np.bincount(stream, minlength=n).astype(np.int64)
    tables = make_tables((n,), dim=4)
    budget = Budget(ratio=10)
    kjt = one_id_per_bag({"f0": torch.arange(n)})
    weights, seen = torch.from_numpy(counts).double(), torch.from_numpy(counts > 0)

    def colliding_share(emb: EmbeddingMethod) -> float:
        rows = physical_ids(emb, kjt)["f0"]
        load = torch.bincount(rows[seen], minlength=int(rows.max()) + 1)
        return (weights * (load[rows] > 1)).sum().item() / weights.sum().item()

    adapt = build_embedding("adapt", tables, budget=budget, id_counts={"f0": counts})
    hashed = build_embedding("hash", tables, budget=budget)
    assert adapt.memory_bytes() <= budget.max_bytes(tables) and hashed.memory_bytes() <= budget.max_bytes(tables)
    adapt_share, hash_share = colliding_share(adapt), colliding_share(hashed)
    assert adapt_share < 0.7 * hash_share, (adapt_share, hash_share)


def test_adapt_budget_solver_takes_the_largest_rows() -> None:
    from recsys_embed.methods.adapt import AdaptiveHotCold

    tables = _adapt_tables()
    budget = Budget(ratio=8)
    emb = build_embedding("adapt", tables, budget=budget, id_counts=_distinct_counts(tables))
    assert emb.memory_bytes() <= budget.max_bytes(tables)
    assert AdaptiveHotCold.rows_bytes(tables, emb.rows + 1, 0.5) > budget.max_bytes(tables)


# ---- mde ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "alpha", "expected"),
    [
        (16, 0.5, [16, 8, 4, 4]),  # factors 1, 1/2, 1/10, 1/100 -> 16, 8, 1.6 (->0, clipped 4), 0.16
        (16, 0.25, [16, 12, 4, 4]),  # 16, 11.3, 5.06, 1.6
        (64, 0.25, [64, 44, 20, 8]),  # 64, 45.25, 20.2, 6.4
        (64, 0.0, [64, 64, 64, 64]),
    ],
)
def test_mde_dims_follow_the_power_law(dim: int, alpha: float, expected: list[int]) -> None:
    tables = make_tables((10, 40, 1000, 100_000), dim=dim)
    assert mixed_dims(tables, alpha) == expected


def test_mde_dims_are_multiples_of_four_inside_the_range() -> None:
    tables = make_tables((3, 17, 300, 5000, 80_000, 10**6), dim=32)
    for alpha in np.linspace(0.0, 2.0, 41):
        dims = mixed_dims(tables, float(alpha))
        assert dims[0] == 32 and all(d % 4 == 0 and 4 <= d <= 32 for d in dims)
        assert dims == sorted(dims, reverse=True)
        for t, d in zip(tables, dims):
            raw = 32 * (t.num_embeddings / 3) ** -alpha
            assert abs(d - raw) <= 2 or d == 4


def test_mde_alpha_zero_is_a_full_table() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    torch.manual_seed(0)
    mde = build_embedding("mde", tables, alpha=0.0)
    full = build_embedding("full", tables)
    assert len(mde.projections) == 0 and mde.memory_bytes() == full.memory_bytes()
    mde.tables.load_state_dict(full.tables.state_dict())
    kjt = random_kjt(tables, batch=16, max_len=4)
    torch.testing.assert_close(mde(kjt).values(), full(kjt).values())


def test_mde_projection_and_memory_by_hand() -> None:
    tables = [table("a", 10, 16, ["x"]), table("b", 1000, 16, ["y", "z"])]
    mde = build_embedding("mde", tables, dims=[16, 4])
    assert list(mde.projections) == ["b"] and mde.projections["b"].weight.shape == (16, 4)
    assert mde.memory_bytes() == (10 * 16 + 1000 * 4 + 4 * 16) * 4 == parameter_bytes(mde)
    kjt = one_id_per_bag({"x": torch.tensor([1, 2]), "y": torch.tensor([5]), "z": torch.tensor([7, 8])})
    out = mde(kjt)
    assert out.length_per_key() == [16, 16, 16]
    rows = weight(mde, "b").detach()
    torch.testing.assert_close(out.to_dict()["z"], rows[[7, 8]] @ mde.projections["b"].weight.detach().T)


@pytest.mark.parametrize("ratio", [1.5, 2.5, 3.5])  # dims 4 everywhere but the smallest table: ratio 4
def test_mde_budget_solver_finds_the_smallest_alpha_that_fits(ratio: float) -> None:
    tables = [table("a", 100, 16, ["x"]), table("b", 2000, 16, ["y"]), table("c", 50_000, 16, ["z"])]
    budget = Budget(ratio=ratio)
    allowed = budget.max_bytes(tables)
    mde = build_embedding("mde", tables, budget=budget)
    assert mde.alpha > 0 and mde.memory_bytes() <= allowed
    assert mde_bytes(tables, without_wasted_projections(tables, mixed_dims(tables, mde.alpha - 1e-6))) > allowed
    out = mde(random_kjt(tables, batch=4))
    assert out.length_per_key() == [16, 16, 16] and out.values().shape == (4, 48)


def test_mde_full_budget_keeps_alpha_zero_and_unreachable_budget_names_the_smallest() -> None:
    tables = make_tables((100, 3000), dim=16)
    assert build_embedding("mde", tables, budget=Budget(ratio=1)).alpha == 0.0
    with pytest.raises(ValueError, match=r"at least \d+ bytes") as info:
        build_embedding("mde", tables, budget=Budget(ratio=1000))
    smallest = smallest_bytes_in(str(info.value))
    assert smallest == ((100 + 16) * 4 + (3000 + 16) * 4) * 4  # the most popular table narrows too
    assert build_embedding("mde", tables, budget=Budget(bytes=smallest)).memory_bytes() == smallest
    with pytest.raises(ValueError, match=f"at least {smallest} bytes"):
        build_embedding("mde", tables, budget=Budget(bytes=smallest - 1))


def test_mde_bytes_need_not_fall_as_alpha_grows() -> None:
    """The issue's example: a dim just below 64 costs more than the full 500-row table (n < d(d - 4) / 4)."""
    tables = make_tables((10, 500), dim=64)
    assert mde_bytes(tables, mixed_dims(tables, 0.0)) == 130_560
    assert mixed_dims(tables, 0.01) == [64, 60] and mde_bytes(tables, mixed_dims(tables, 0.01)) == 137_920
    assert without_wasted_projections(tables, [64, 60]) == [64, 64]
    assert build_embedding("mde", tables, budget=Budget(bytes=130_560)).dims == [64, 64]
    # one byte less: 60 would cost more than full rows, 56 is the widest that fits
    assert build_embedding("mde", tables, budget=Budget(bytes=130_559)).dims == [64, 56]


def test_mde_budget_solver_takes_the_smallest_alpha_where_bisection_did_not() -> None:
    """Bisection on alpha (which assumed bytes fall as alpha grows) gave [64, 60, 56] here; [64, 64, 60] fits at a
    smaller alpha."""
    tables = make_tables((10, 500, 2000), dim=64)
    mde = build_embedding("mde", tables, budget=Budget(bytes=625_929))
    assert mde.dims == [64, 64, 60] and mde.memory_bytes() <= 625_929


@pytest.mark.parametrize("cards", [(10, 500), (10, 500, 2000), (10, 200, 900, 5000), (3, 40, 7000)])
def test_mde_every_budget_down_to_the_true_ceiling_is_met_with_the_smallest_alpha(cards: tuple[int, ...]) -> None:
    tables = make_tables(cards, dim=64)
    floor = sum(min(n * 64, (n + 64) * 4) for n in cards) * 4
    grid = np.linspace(0.0, 3.0, 601)
    family = [mde_bytes(tables, without_wasted_projections(tables, mixed_dims(tables, float(a)))) for a in grid]
    for allowed in range(floor, full_bytes(tables) + 1, max(997, (full_bytes(tables) - floor) // 150 + 1)):
        mde = build_embedding("mde", tables, budget=Budget(bytes=allowed))
        assert mde.memory_bytes() <= allowed
        assert mde.dims == without_wasted_projections(tables, mde.dims)  # no projection bigger than its savings
        below = [b for a, b in zip(grid, family) if a < mde.alpha - 1e-6]
        assert all(b > allowed for b in below), (allowed, mde.alpha, mde.dims)
    with pytest.raises(ValueError, match=f"at least {floor} bytes"):
        build_embedding("mde", tables, budget=Budget(bytes=floor - 1))


def test_mde_option_errors() -> None:
    tables = make_tables((10, 1000), dim=8)
    with pytest.raises(ValueError, match=r"one value per table \(2\), got \[8\]"):
        build_embedding("mde", tables, dims=[8])
    for dims, bad in (([8, 0], 0), ([8, 12], 12), ([8, 6], 6)):
        with pytest.raises(ValueError, match=rf"table 't1' gets dim {bad} from dims, but each dim must be in \[4, 8\]"):
            build_embedding("mde", tables, dims=dims)
    with pytest.raises(ValueError, match=r"table 't0' gets dim 6 from alpha=0.0.*multiple of 4"):
        build_embedding("mde", make_tables((10,), dim=6), alpha=0.0)
    with pytest.raises(ValueError, match="alpha >= 0"):
        build_embedding("mde", tables, alpha=-0.1)
    with pytest.raises(ValueError, match="either alpha=/dims= or budget="):
        build_embedding("mde", tables, alpha=0.2, budget=Budget(ratio=2))


# ---- fused parity -------------------------------------------------------------------------------------------------

MIXED = [table("a", 7, 8, ["f0"]), table("b", 50, 16, ["f1", "f2"]), table("c", 3000, 16, ["f3"])]
FUSED_CASES: list[tuple[str, list[EmbeddingBagConfig], dict[str, object]]] = [
    ("hash", make_tables(), {"rows": 100}),
    ("hash", make_tables(), {"rows": 100, "shared": True}),
    ("multi_hash", MIXED, {"rows": 40, "num_hashes": 3}),
    ("qr", MIXED, {"collisions": [1, 4, 9], "operation": "mult"}),
    ("qr", MIXED, {"collisions": 5, "operation": "add", "partitions": 3}),
    ("qr", MIXED, {"collisions": 6, "operation": "concat"}),
    ("qr_path", MIXED, {"collisions": [1, 4, 9]}),
    ("unified", MIXED, {"rows": 300, "chunk_dim": 8}),
    ("unified", MIXED, {"rows": 3100, "hash": "identity", "chunk_dim": 4}),
    ("adapt", MIXED, {"rows": 60, "id_counts": zipf_counts(MIXED)}),
    ("mde", MIXED, {"alpha": 0.5}),
]


@pytest.mark.parametrize(
    ("name", "tables", "options"), FUSED_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FUSED_CASES)]
)
def test_fused_tables_give_the_same_output(
    name: str, tables: list[EmbeddingBagConfig], options: dict[str, object]
) -> None:
    torch.manual_seed(0)
    emb = build_embedding(name, tables, **options)
    kjt = all_features_kjt(tables, batch=16, max_len=4, seed=7)
    with torch.no_grad():
        before = emb(kjt).values()
    assert fuse_tables(emb, SparseOptimizer()) == 1
    with torch.no_grad():
        after = emb(kjt).values()
    torch.testing.assert_close(after, before)


# ---- ids >= 2^31 --------------------------------------------------------------------------------------------------

BIG_IDS = [2**31 - 1, 2**31, 2**31 + 7, 5_000_000_000, 2**40 + 3, 2**62, 2**63 - 1]
HASHING: list[tuple[str, dict[str, object]]] = [
    ("hash", {"rows": 10}),
    ("hash", {"rows": 10, "hash": "identity"}),
    ("multi_hash", {"rows": 10, "num_hashes": 3}),
    ("unified", {"rows": 10, "chunk_dim": 4}),
    ("unified", {"rows": 10, "chunk_dim": 4, "hash": "identity"}),
]


@pytest.mark.parametrize(("name", "options"), HASHING, ids=[f"{c[0]}-{i}" for i, c in enumerate(HASHING)])
def test_big_ids_on_hashed_tables_stay_in_range(name: str, options: dict[str, object]) -> None:
    tables = make_tables((1000, 5000), dim=8)
    emb = build_embedding(name, tables, **options)
    ids = torch.tensor(BIG_IDS)
    kjt = one_id_per_bag({"f0": ids, "f1": ids.flip(0)})
    for key, rows in physical_ids(emb, kjt).items():
        assert rows.min() >= 0 and rows.max() < 10, key
    out = emb(kjt).values()
    assert out.shape == (len(BIG_IDS), 16) and torch.isfinite(out).all()
    assert torch.count_nonzero(out) > 0


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("hash", {"rows": 100, "hash": "identity"}),
        ("unified", {"rows": 100, "chunk_dim": 4}),
    ],
)
def test_big_ids_on_small_tables_stay_in_range(name: str, options: dict[str, object]) -> None:
    """A method that accepts any id must wrap it also on tables small enough to stay full (n=7 <= rows)."""
    tables = make_tables((7, 3000), dim=8)
    emb = build_embedding(name, tables, **options)
    kjt = one_id_per_bag({"f0": torch.tensor([3, 2**31 + 5]), "f1": torch.tensor([2**40, 11])})
    table_rows = {c.name: c.num_embeddings for c in emb.tables.embedding_bag_configs()}
    most = max(table_rows.values())
    for key, rows in physical_ids(emb, kjt).items():
        assert rows.min() >= 0 and rows.max() < (table_rows.get("t0", most) if key.startswith("f0") else most), key
    assert torch.isfinite(emb(kjt).values()).all()


@pytest.mark.parametrize("name", ["hash", "multi_hash"])
def test_big_ids_on_small_unhashed_tables_are_a_clear_error(name: str) -> None:
    """Tables small enough to stay full are not hashed, so their ids keep the range check."""
    emb = build_embedding(name, make_tables((7, 3000), dim=8), rows=100)
    kjt = one_id_per_bag({"f0": torch.tensor([3, 2**31 + 5]), "f1": torch.tensor([2**40, 11])})
    with pytest.raises(
        ValueError,
        match=r"Feature 'f0' has id 2147483653, but it was declared with 7 ids.*keeps this one's table unhashed",
    ):
        emb(kjt)


# ---- tables read by several features ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("hash", {"rows": 100}),
        ("multi_hash", {"rows": 100}),
        ("adapt", {"rows": 100, "id_counts": zipf_counts([table("t0", 3000, 8, ["a", "b"])])}),
        ("qr", {"collisions": 7}),
        ("qr_path", {"collisions": 7}),
        ("mde", {"alpha": 0.5}),
    ],
)
def test_features_of_one_table_read_the_same_rows(name: str, options: dict[str, object]) -> None:
    tables = [table("t0", 3000, 8, ["a", "b"]), table("t1", 10, 8, ["c"])]
    emb = build_embedding(name, tables, **options)
    ids = torch.arange(3000)
    out = emb(one_id_per_bag({"a": ids, "b": ids, "c": torch.arange(10)})).to_dict()
    torch.testing.assert_close(out["a"], out["b"])


@pytest.mark.parametrize(
    ("name", "options"), [("multi_hash", {"rows": 40, "num_hashes": 3}), ("qr", {"operation": "add", "collisions": 5})]
)
def test_rows_folded_into_bags_sum_exactly_over_multi_id_bags(name: str, options: dict[str, object]) -> None:
    """Bags of several ids: output = sum over the bag's ids of the sum of each id's k rows (computed by hand)."""
    tables = make_tables((7, 50, 300), dim=4)
    emb = build_embedding(name, tables, **options)
    kjt = random_kjt(tables, batch=6, max_len=4, seed=3)
    out = emb(kjt).to_dict()
    for t in tables:
        f = t.feature_names[0]
        w = weight(emb, t.name).detach()
        for b, ids in enumerate(kjt.to_dict()[f].to_dense()):
            expected = torch.zeros(4)
            for x in ids.tolist():
                single = one_id_per_bag(
                    {g.feature_names[0]: torch.tensor([0]) for g in tables} | {f: torch.tensor([x])}
                )
                copies = [v for key, v in physical_ids(emb, single).items() if key.split("@")[0] == f]
                rows = torch.cat(copies) if copies else emb.remap(single).to_dict()[f].values()
                expected += w[rows].sum(0)
            torch.testing.assert_close(out[f][b], expected)


def test_qr_path_with_one_collision_and_identity_maps_equals_full() -> None:
    tables = make_tables((7, 50, 300), dim=4)
    path = build_embedding("qr_path", tables, collisions=1)
    full = build_embedding("full", tables)
    for t in tables:
        weight(path, t.name).data.copy_(weight(full, t.name))  # maps start at the identity
    kjt = random_kjt(tables, batch=6, max_len=1, seed=2)
    torch.testing.assert_close(path(kjt).values(), full(kjt).values())


def test_qr_path_applies_the_remainders_map_to_the_quotient_row() -> None:
    tables = make_tables((100,), dim=4)
    path = build_embedding("qr_path", tables, collisions=7)
    torch.manual_seed(0)
    maps, rows = path.maps["t0"], weight(path, "t0")
    assert maps.shape == (7, 4, 4) and rows.shape == (15, 4)
    maps.data.normal_()
    x = torch.tensor([0, 13, 99])
    out = path(one_id_per_bag({"f0": x})).values().detach()
    for i, v in enumerate(x.tolist()):
        expected = maps[v % 7].detach() @ rows[v // 7].detach()
        torch.testing.assert_close(out[i], expected)
    assert path.memory_bytes() == (7 * 16 + 15 * 4) * 4


def test_qr_path_pools_maps_and_rows_per_bag_with_exact_gradients() -> None:
    """Bags of several ids and mixed dims: (sum of the bag's maps) @ (sum of its quotient rows), and the gradients
    of both parts equal autograd's through that definition (computed densely by hand)."""
    tables = [table("a", 7, 4, ["f0"]), table("b", 50, 8, ["f1", "f2"]), table("c", 300, 8, ["f3"])]
    torch.manual_seed(0)
    path = build_embedding("qr_path", tables, collisions=[2, 3, 11])
    for maps in path.maps.values():
        maps.data.normal_()
    kjt = all_features_kjt(tables, batch=5, max_len=4, seed=1)
    out = path(kjt).to_dict()
    grads = {f: torch.randn_like(v) for f, v in out.items()}
    sum((out[f] * grads[f]).sum() for f in out).backward()

    maps = {t.name: path.maps[t.name].detach().clone().requires_grad_() for t in tables}
    rows = {t.name: weight(path, t.name).detach().clone().requires_grad_() for t in tables}
    total = torch.zeros(())
    for t, base in zip(tables, path.bases):
        for f in t.feature_names:
            for b, ids in enumerate(kjt.to_dict()[f].to_dense()):
                pooled_map = sum((maps[t.name][x % base] for x in ids.tolist()), torch.zeros(t.embedding_dim, 1))
                pooled_row = sum((rows[t.name][x // base] for x in ids.tolist()), torch.zeros(t.embedding_dim))
                expected = pooled_map @ pooled_row if len(ids) else torch.zeros(t.embedding_dim)
                torch.testing.assert_close(out[f][b], expected.detach())
                total = total + (expected * grads[f][b]).sum()
    total.backward()
    for t in tables:
        torch.testing.assert_close(path.maps[t.name].grad, maps[t.name].grad)
        torch.testing.assert_close(weight(path, t.name).grad, rows[t.name].grad)


def test_qr_path_budget_solver_and_errors() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    emb = build_embedding("qr_path", tables, budget=Budget(ratio=4))
    assert emb.memory_bytes() <= Budget(ratio=4).max_bytes(tables)
    with pytest.raises(ValueError, match=r"at least \d+ bytes"):
        build_embedding("qr_path", tables, budget=Budget(bytes=100))
    with pytest.raises(ValueError, match="collisions must be >= 1"):
        build_embedding("qr_path", tables, collisions=0)


def qr_rows_by_formula(qr: QREmbedding, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """``(k, N)``: the partition rows ``c * b + digit_c`` of every id with per-id int64 floor division."""
    ids = kjt.values().to(torch.int64)
    base = qr.base.repeat_interleave(torch.tensor(kjt.length_per_key()))
    rows, rest = [], ids
    for c in range(qr.partitions - 1):
        rows.append(c * base + rest % base)
        rest = rest // base
    return torch.stack(rows + [(qr.partitions - 1) * base + rest])


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
@pytest.mark.parametrize("partitions", [2, 3])
@pytest.mark.parametrize("collisions", [[1, 7, 1, 3], [1, 1, 1, 1], [2, 7, 5, 3]])
def test_qr_remap_equals_the_formula_on_uniform_and_ragged_batches(
    operation: str, partitions: int, collisions: list[int]
) -> None:
    """Base-1 tables skip the division on uniform batches (one id per feature and sample); rows stay the formula's,
    ids >= 2^31 included (remap only: ``validate_ids=False``)."""
    tables = make_tables((10, 5000, 70, 2000), dim=24)
    qr = build_embedding(
        "qr", tables, collisions=collisions, partitions=partitions, operation=operation, validate_ids=False
    )
    keys = [f for t in tables for f in t.feature_names]
    values = torch.cat([torch.randint(0, t.num_embeddings, (6,)) for t in tables])
    values[[1, 7, 14, 20]] = torch.tensor([2**31 + 3, 2**40 + 1, 2**62 + 5, 2**31 - 1])
    uniform = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.ones(24, dtype=torch.long))
    lengths = torch.ones(24, dtype=torch.long)
    lengths[-1] = 2
    ragged = KeyedJaggedTensor(keys=keys, values=torch.cat([values, torch.tensor([4])]), lengths=lengths)
    for kjt in (uniform, ragged):
        expected = qr.executor(kjt, qr_rows_by_formula(qr, kjt))
        remapped = qr.remap(kjt)
        assert torch.equal(remapped.values(), expected.values())
        assert torch.equal(remapped.lengths(), expected.lengths())
        assert remapped.keys() == expected.keys() and remapped.stride() == expected.stride()


# ---- degenerate settings equal a full table -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hash", "multi_hash", "adapt"])
@pytest.mark.parametrize("layout", ["one_id_per_bag", "ragged"])
def test_rows_at_or_above_every_cardinality_equal_full(name: str, layout: str) -> None:
    """With ``rows`` >= every table's ids no table is hashed: the method is a full table (both batch layouts)."""
    tables = make_tables((7, 50, 300), dim=8)
    options = {"id_counts": zipf_counts(tables)} if name == "adapt" else {}
    emb = build_embedding(name, tables, rows=300, **options)
    assert emb.unbounded_features == set()
    full = build_embedding("full", tables)
    with torch.no_grad():
        for t in tables:
            weight(emb, t.name).copy_(weight(full, t.name))
    if layout == "ragged":
        kjt = random_kjt(tables, batch=16, max_len=4, seed=2)
    else:
        kjt = one_id_per_bag(
            {"f0": torch.arange(7).repeat(43)[:300], "f1": torch.arange(300) % 50, "f2": torch.arange(300)}
        )
    torch.testing.assert_close(emb(kjt).values(), full(kjt).values())

"""TT-Rec: factors, the memory formula, the budget solver, the init scale, and a known answer (TT-SVD of a table)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.catalog import default_tables
from recsys_embed.methods import Budget, build_embedding, full_bytes
from recsys_embed.methods.solvers import ceil_root
from recsys_embed.methods.tt_rec import dim_factors, row_factors, tt_bytes, tt_rec_bytes, tt_rows
from tests.conftest import make_tables, random_kjt


@pytest.mark.parametrize(("d", "expected"), [(16, (2, 2, 4)), (8, (2, 2, 2)), (64, (4, 4, 4)), (13, (1, 1, 13))])
def test_dim_factors_are_exact_and_balanced(d: int, expected: tuple[int, int, int]) -> None:
    assert dim_factors(d) == expected


def test_row_factors_are_balanced_with_the_least_padding() -> None:
    """Against brute force: the largest factor is ceil(n^(1/3)) and no triple under it pads less."""
    for n in list(range(1, 300)) + [1000, 1001, 3000, 65_537, 10**6]:
        factors = row_factors(n)
        m = ceil_root(n, 3)
        assert math.prod(factors) >= n and max(factors) == m
        least = min(a * b * c for a, b, c in itertools.product(range(1, m + 1), repeat=3) if a * b * c >= n)
        assert math.prod(factors) == least, n
        assert factors[1] == min(factors)  # the middle core (its r^2 term) takes the smallest factor
    assert row_factors(10**6) == (100, 100, 100)


def test_memory_is_the_cores_plus_the_tables_kept_full() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    emb = build_embedding("tt_rec", tables, rank=8)
    assert emb.tt_tables == ["t2"] and emb.kept_full == ["t0", "t1"]  # TT would not save bytes on t0, t1
    assert tt_bytes(50, 8, 8) >= 50 * 8 * 4 and tt_bytes(3000, 8, 8) < 3000 * 8 * 4
    shapes = [tuple(p.shape) for p in emb.cores["t2"]]
    assert shapes == [(1, 15, 2, 8), (8, 14, 2, 8), (8, 15, 2, 1)]
    cores = sum(p.numel() for p in emb.cores.parameters()) * 4
    assert emb.memory_bytes() == cores + (7 + 50) * 8 * 4 == tt_bytes(3000, 8, 8) + (7 + 50) * 8 * 4
    forced = build_embedding("tt_rec", tables, rank=8, full_tables=[])
    assert forced.tt_tables == ["t0", "t1", "t2"] and not forced.storage()


@pytest.mark.parametrize("ratio", [2, 10, 50])
def test_the_budget_solver_takes_the_largest_rank_that_fits(ratio: float) -> None:
    tables = make_tables((7, 50, 3000, 20_000), dim=16)
    budget = Budget(ratio=ratio)
    emb = build_embedding("tt_rec", tables, budget=budget)
    allowed = budget.max_bytes(tables)
    assert emb.memory_bytes() <= allowed < tt_rec_bytes(tables, emb.rank + 1, None)
    assert emb.compression_ratio() >= ratio


def test_an_unreachable_budget_names_the_reachable_range() -> None:
    tables = make_tables((7, 50, 3000), dim=8)
    rank_one = tt_rec_bytes(tables, 1, None)
    ratio = full_bytes(tables) / rank_one
    with pytest.raises(ValueError, match=rf"rank 1 already needs {rank_one} bytes.*ratios 1\.0x to {ratio:.1f}x"):
        build_embedding("tt_rec", tables, budget=Budget(ratio=ratio * 1.5))
    assert build_embedding("tt_rec", tables, budget=Budget(bytes=rank_one)).rank == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [({"rank": 0}, "needs rank >= 1"), ({"rank": 4, "full_tables": ["t9"]}, r"unknown tables \['t9'\]")],
)
def test_bad_options_are_one_clear_error(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_embedding("tt_rec", make_tables(), **options)


def test_default_synthetic_tables_reach_10x_and_100x() -> None:
    tables = default_tables()
    for ratio in (10, 100):
        emb = build_embedding("tt_rec", tables, budget=Budget(ratio=ratio), device="meta")
        assert ratio <= emb.compression_ratio() < 1.2 * ratio and emb.tt_tables


def test_init_matches_a_full_tables_variance() -> None:
    """Sampled Gaussian cores: the rows' entries have TorchRec's default full-table variance 1 / (3n)."""
    torch.manual_seed(0)
    n = 50_000
    tables = [EmbeddingBagConfig(name="big", num_embeddings=n, embedding_dim=16, feature_names=["f"])]
    emb = build_embedding("tt_rec", tables, rank=16)
    assert emb.tt_tables == ["big"]
    rows = emb.all_embeddings("f").detach()
    assert rows.mean().abs() < 0.05 * rows.std()
    assert rows.var().item() == pytest.approx(1 / (3 * n), rel=0.15)


def tt_svd(
    table: torch.Tensor, rows: tuple[int, int, int], dims: tuple[int, int, int], rank: int
) -> list[torch.Tensor]:
    """Cores ``(r_{k-1}, n_k, d_k, r_k)`` of ``table`` (zero-padded to ``prod(rows)`` rows) by two truncated SVDs,
    each core zero-padded to ``rank``: exact when ``rank`` reaches the table's TT ranks."""
    (n1, n2, n3), (d1, d2, d3) = rows, dims
    padded = torch.zeros(n1 * n2 * n3, d1 * d2 * d3, dtype=torch.float64)
    padded[: table.shape[0]] = table.double()
    # row x = (i1 * n3 + i3) * n2 + i2 (the method's digit order), column (j1 * d2 + j2) * d3 + j3
    tensor = padded.view(n1, n3, n2, d1, d2, d3).permute(0, 3, 2, 4, 1, 5)  # (n1, d1, n2, d2, n3, d3)
    u, s, vh = torch.linalg.svd(tensor.reshape(n1 * d1, -1), full_matrices=False)
    r1 = min(rank, s.numel())
    g1, rest = u[:, :r1], s[:r1, None] * vh[:r1]
    u, s, vh = torch.linalg.svd(rest.reshape(r1 * n2 * d2, n3 * d3), full_matrices=False)
    r2 = min(rank, s.numel())
    g2, g3 = u[:, :r2], s[:r2, None] * vh[:r2]
    cores = [
        torch.zeros(1, n1, d1, rank, dtype=torch.float64),
        torch.zeros(rank, n2, d2, rank, dtype=torch.float64),
        torch.zeros(rank, n3, d3, 1, dtype=torch.float64),
    ]
    cores[0][..., :r1] = g1.reshape(1, n1, d1, r1)
    cores[1][:r1, ..., :r2] = g2.reshape(r1, n2, d2, r2)
    cores[2][:r2] = g3.reshape(r2, n3, d3, 1)
    return [c.float() for c in cores]


def test_full_rank_reproduces_a_given_table_exactly() -> None:
    """Known answer: the TT-SVD cores of a random table at full rank, loaded, give back the table's rows (per id,
    and pooled as TorchRec's EBC pools them), next to a table kept full; per-id rows carry gradients to the cores."""
    tables = [
        EmbeddingBagConfig(name="given", num_embeddings=60, embedding_dim=8, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="kept", num_embeddings=9, embedding_dim=4, feature_names=["c"]),
    ]
    given = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    emb = build_embedding(
        "tt_rec", tables, rank=8, full_tables=["kept"]
    )  # 8 = the full TT rank of (4, 4, 4) x (2, 2, 2)
    assert emb.factors["given"] == ((4, 4, 4), (2, 2, 2))
    with torch.no_grad():
        for param, core in zip(emb.cores["given"], tt_svd(given, (4, 4, 4), (2, 2, 2), rank=8)):
            param.copy_(core)
    for feature in ("a", "b"):
        torch.testing.assert_close(emb.all_embeddings(feature, batch_size=7), given, atol=1e-5, rtol=1e-5)
    reference = EmbeddingBagCollection(tables=tables)
    with torch.no_grad():
        reference.embedding_bags["given"].weight.copy_(given)
        reference.embedding_bags["kept"].weight.copy_(emb.tables.embedding_bags["kept"].weight)
    kjt = random_kjt(tables[:1] + tables[:1] + tables[1:], batch=6, max_len=4, seed=3)
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=kjt.values(), lengths=kjt.lengths(), stride=6)
    torch.testing.assert_close(emb(kjt).values(), reference(kjt).values(), atol=1e-5, rtol=1e-5)
    rows = emb.embeddings("a", torch.tensor([0, 59, 17]))
    radix = emb.factors["given"][0]
    torch.testing.assert_close(rows, tt_rows(list(emb.cores["given"]), torch.tensor([0, 59, 17]), *radix[1:]))
    rows.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.cores["given"])


def test_a_low_rank_table_needs_only_its_rank() -> None:
    """A table that is an exact rank-3 tensor train is recovered at rank 3 (ids past the padding never read)."""
    g = torch.Generator().manual_seed(1)
    cores = [
        torch.randn(1, 10, 2, 3, generator=g),
        torch.randn(3, 10, 2, 3, generator=g),
        torch.randn(3, 10, 4, 1, generator=g),
    ]
    table = tt_rows(cores, torch.arange(1000), 10, 10)
    tables = [EmbeddingBagConfig(name="low", num_embeddings=1000, embedding_dim=16, feature_names=["f"])]
    emb = build_embedding("tt_rec", tables, rank=3)
    with torch.no_grad():
        for param, core in zip(emb.cores["low"], tt_svd(table, (10, 10, 10), (2, 2, 4), rank=3)):
            param.copy_(core)
    torch.testing.assert_close(emb.all_embeddings("f"), table, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pick", ["all", "one_middle_slice", "one", "none"])
def test_rows_equal_the_chain_product_per_id(pick: str) -> None:
    """The grouped contraction against the definition, per id (``x = (i1 * n3 + i3) * n2 + i2``), also when every
    id falls into one middle slice (the largest padding) and for no ids at all."""
    g = torch.Generator().manual_seed(2)
    cores = [
        torch.randn(1, 5, 2, 3, generator=g),
        torch.randn(3, 4, 2, 3, generator=g),
        torch.randn(3, 6, 4, 1, generator=g),
    ]
    ids = {
        "all": torch.arange(120),
        "one_middle_slice": torch.arange(1, 120, 4),
        "one": torch.tensor([77]),
        "none": torch.zeros(0, dtype=torch.int64),
    }[pick]
    i2, i3, i1 = ids % 4, (ids // 4) % 6, ids // 24
    expected = torch.einsum("uia,aujb,buk->uijk", cores[0][0, i1], cores[1][:, i2], cores[2][:, i3, :, 0])
    torch.testing.assert_close(tt_rows(cores, ids, 4, 6), expected.reshape(-1, 16))

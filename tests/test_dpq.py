"""``dpq`` (and the product-quantisation core in ``methods/codebooks.py``): packed codes, nearest centroids, the
straight-through gradients, known answers, the budget solver and its errors, dead-centroid re-seeding."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig

from recsys_embed.methods import Budget, build_embedding, full_bytes
from recsys_embed.methods import codebooks as pq
from tests.conftest import make_tables, random_kjt


def one_table(n: int = 50, dim: int = 8) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=dim, feature_names=["f"])]


@pytest.mark.parametrize("bits", [1, 3, 5, 8, 11, 16])
def test_packed_codes_round_trip_at_their_bit_width(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37, 3), generator=g)
    packed = pq.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == pq.code_bytes(37, 3, bits) == -(-37 * 3 * bits // 8)
    torch.testing.assert_close(pq.unpack_codes(packed, torch.arange(37), parts=3, bits=bits), codes)
    some = torch.tensor([36, 0, 5, 5])
    torch.testing.assert_close(pq.unpack_codes(packed, some, parts=3, bits=bits), codes[some])


def test_packing_refuses_codes_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pq.pack_codes(torch.tensor([[8]]), bits=3)
    with pytest.raises(ValueError, match="1 to 16 bits"):
        pq.pack_codes(torch.tensor([[0]]), bits=17)


def test_nearest_centroids_is_the_argmin_and_does_not_depend_on_the_batch() -> None:
    g = torch.Generator().manual_seed(0)
    parts, codebook = torch.randn(300, 4, 2, generator=g), torch.randn(4, 16, 2, generator=g)
    codes = pq.nearest_centroids(parts, codebook, chunk=64)
    brute = torch.stack([torch.cdist(parts[:, j], codebook[j]).argmin(1) for j in range(4)], 1)
    torch.testing.assert_close(codes, brute)
    alone = torch.cat([pq.nearest_centroids(parts[i : i + 1], codebook) for i in range(300)])
    torch.testing.assert_close(alone, codes)
    limited = pq.nearest_centroids(parts, codebook, allowed=torch.full((300,), 5))
    assert int(limited.max()) < 5 and not torch.equal(limited, codes)


def test_straight_through_gives_the_queries_the_output_gradient_and_the_codebook_the_centroid_term() -> None:
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(10, 4, generator=g, requires_grad=True)
    codebook = torch.randn(2, 3, 2, generator=g, requires_grad=True)
    codes = pq.nearest_centroids(queries.view(10, 2, 2), codebook)
    out = pq.StraightThroughQuantize.apply(queries, codebook, codes)
    torch.testing.assert_close(out, pq.centroid_rows(codebook, codes))
    upstream = torch.randn(10, 4, generator=g)
    out.backward(upstream)
    torch.testing.assert_close(queries.grad, upstream)
    expected = codebook.detach().clone().requires_grad_(True)
    (pq.centroid_rows(expected, codes) - queries.detach()).pow(2).mean().backward()  # the paper's centroid term
    torch.testing.assert_close(codebook.grad, expected.grad)


def test_as_many_centroids_as_ids_and_one_part_represent_a_table_exactly() -> None:
    """DPQ with ``K >= n`` and ``D = 1``: every id can own a centroid, so any table is represented exactly."""
    target = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))

    def error(centroids: int) -> float:
        emb = build_embedding("dpq", one_table(), num_parts=1, num_centroids=centroids, keep_small_tables=False)
        with torch.no_grad():
            emb.queries("t").copy_(target)
        emb.init_codebooks()
        served = emb.to_serving()
        every = torch.arange(50)
        torch.testing.assert_close(served.embeddings("f", every), emb.eval().embeddings("f", every), rtol=0, atol=0)
        return float((served.embeddings("f", every) - target).abs().max().detach())

    assert error(64) == 0.0
    assert error(16) > 0.1  # fewer centroids than ids cannot


def test_memory_formula_by_hand() -> None:
    tables = make_tables()  # 7, 50 and 3000 ids at dim 8
    emb = build_embedding("dpq", tables, num_parts=4, num_centroids=256)
    assert emb.coded_tables == ["t2"]  # the small tables' rows take fewer bytes than a 256-centroid codebook
    codes, codebook = 3000 * 4 * 8 // 8, 256 * 8 * 4
    assert emb.memory_bytes() == codes + codebook + (7 + 50) * 8 * 4
    assert emb.training_bytes() > emb.memory_bytes()  # the query table is training-only
    odd = build_embedding("dpq", tables, num_parts=8, num_centroids=5, keep_small_tables=False)
    assert odd.memory_bytes() == sum(-(-t.num_embeddings * 8 * 3 // 8) + 5 * 8 * 4 for t in tables)  # 3-bit codes


def test_budget_solver_takes_the_most_code_bits_that_fit() -> None:
    tables = make_tables()
    emb = build_embedding("dpq", tables, budget=Budget(ratio=4))
    assert (emb.num_parts, emb.num_centroids) == (8, 64)  # 48 bits per id; 56 bits (8 x 128) is over the budget
    assert emb.memory_bytes() <= Budget(ratio=4).max_bytes(tables)
    over = build_embedding("dpq", tables, num_parts=8, num_centroids=128)
    assert over.memory_bytes() > Budget(ratio=4).max_bytes(tables)


def test_budget_below_the_ceiling_is_one_clear_error() -> None:
    tables = make_tables()
    fewest = build_embedding("dpq", tables, num_parts=1, num_centroids=2).memory_bytes()
    message = rf"'dpq' cannot fit .*are {fewest} \(ratio .*ceiling.*at least {fewest} bytes"
    with pytest.raises(ValueError, match=message):
        build_embedding("dpq", tables, budget=Budget(bytes=fewest - 1))
    assert build_embedding("dpq", tables, budget=Budget(bytes=fewest)).memory_bytes() == fewest
    assert full_bytes(tables) / fewest > 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_parts": 3}, "num_parts dividing every embedding_dim"),
        ({"num_parts": 2, "num_centroids": 1}, "2 <= centroids"),
        ({"num_parts": 2, "reseed_every": -1}, "reseed_every >= 0"),
    ],
)
def test_bad_options_are_clear_errors(options: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_embedding("dpq", make_tables(), **options)


def test_dead_centroids_are_reseeded_onto_recent_queries() -> None:
    tables = one_table(n=3000)
    emb = build_embedding("dpq", tables, num_parts=2, num_centroids=16, reseed_every=5)
    with torch.no_grad():
        emb.codebooks["t"][0, 3] = 1e3  # far from every query: no id can choose it
    kjt = random_kjt(tables, batch=64, seed=3, allow_empty=False)
    emb(kjt)
    assert int(emb.usage_t[0, 3]) == 0 and int(emb.usage_t.sum()) == 2 * kjt.values().numel()
    emb.on_train_step(3)  # not a re-seed step
    assert float(emb.codebooks["t"].detach()[0, 3, 0]) == 1e3
    emb.on_train_step(4)
    moved = emb.codebooks["t"].detach()[0, 3]
    queries = emb.queries("t").detach()[kjt.values()].view(-1, 2, 4)[:, 0]
    assert bool((queries == moved).all(1).any())  # it now sits on a query of the last batch
    assert int(emb.usage_t.sum()) == 0  # counting starts again

"""``robe``: known answer (identity offsets reproduce full tables), the hashed read against a per-id Python
definition (blocks, columns, signs, pooling) and its gradient, sparse fused updates, hash pins and statistics, the
budget solver, the memory formula, option errors."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.catalog import default_tables
from recsys_embed.methods import Budget, SparseOptimizer, build_embedding, fuse_tables
from recsys_embed.methods.base import full_bytes
from recsys_embed.methods.hash_fn import reference_hash64
from recsys_embed.methods.robe import ROBEEmbedding
from tests.conftest import random_kjt

#: mixed dims, a table read by two features, a 1-id table
TABLES = [
    EmbeddingBagConfig(name="a", num_embeddings=7, embedding_dim=8, feature_names=["fa"]),
    EmbeddingBagConfig(name="b", num_embeddings=50, embedding_dim=16, feature_names=["fb", "fc"]),
    EmbeddingBagConfig(name="c", num_embeddings=300, embedding_dim=8, feature_names=["fd"]),
    EmbeddingBagConfig(name="d", num_embeddings=1, embedding_dim=8, feature_names=["fe"]),
]
FULL_VALUES = sum(t.num_embeddings * t.embedding_dim for t in TABLES)


def batch(size: int = 9, max_len: int = 3, seed: int = 0) -> KeyedJaggedTensor:
    """Bags of 0..max_len ids over every feature of TABLES."""
    g = torch.Generator().manual_seed(seed)
    keys, lengths, values = [], [], []
    for t in TABLES:
        for f in t.feature_names:
            lens = torch.randint(0, max_len + 1, (size,), generator=g)
            keys.append(f)
            lengths.append(lens)
            values.append(torch.randint(0, t.num_embeddings, (int(lens.sum()),), generator=g))
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=size)


def array_of(emb: ROBEEmbedding) -> torch.Tensor:
    return emb.tables.embedding_bags["robe"].weight  # type: ignore[union-attr]


def reference_vector(emb: ROBEEmbedding, array: torch.Tensor, feature: str, x: int) -> torch.Tensor:
    """The ROBE definition for one id, restated here: block k reads Z elements at its slot, times its sign."""
    flat, z = array.reshape(-1), emb.block_size
    t = next(i for i, table in enumerate(TABLES) if feature in table.feature_names)
    blocks, slots = TABLES[t].embedding_dim // z, emb.array_size // z
    start = sum(table.num_embeddings * table.embedding_dim for table in TABLES[:t])
    parts = []
    for k in range(blocks):
        if emb.hash_name == "identity":
            slot, sign = (start // z + x * blocks + k) % slots, 1.0
        else:
            h = reference_hash64(x, int(emb.seeds[t, k]))
            slot, sign = (h & (2**63 - 1)) % slots, (-1.0 if h < 0 else 1.0)
        parts.append(sign * flat[slot * z : slot * z + z])
    return torch.cat(parts)


def reference_pooled(emb: ROBEEmbedding, array: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    out = {}
    for f, jagged in kjt.to_dict().items():
        dim = next(t.embedding_dim for t in TABLES if f in t.feature_names)
        bags = [
            sum((reference_vector(emb, array, f, int(x)) for x in ids), torch.zeros(dim))
            for ids in torch.split(jagged.values(), jagged.lengths().tolist())
        ]
        out[f] = torch.stack(bags)
    return out


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_identity_offsets_with_the_full_array_reproduce_the_tables(block_size: int) -> None:
    """Known answer: an array of sum n*d values laid out table by table reproduces every table exactly, also fused."""
    robe = build_embedding("robe", TABLES, array_size=FULL_VALUES, block_size=block_size, hash="identity")
    full = build_embedding("full", TABLES)
    given = torch.randn(FULL_VALUES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        array_of(robe).copy_(given.view_as(array_of(robe)))
        start = 0
        for t in TABLES:
            rows = full.tables.embedding_bags[t.name].weight  # type: ignore[union-attr]
            rows.copy_(given[start : start + rows.numel()].view_as(rows))
            start += rows.numel()
    for kjt in (batch(), batch(size=6, max_len=1, seed=2)):
        torch.testing.assert_close(robe(kjt).values(), full(kjt).values(), rtol=0, atol=1e-6)
    uniform = random_kjt(TABLES[:1], batch=5, allow_empty=False, max_len=1)  # one id per bag: the reshape path
    only_a = build_embedding("robe", TABLES[:1], array_size=56, block_size=block_size, hash="identity")
    with torch.no_grad():
        array_of(only_a).copy_(given[:56].view_as(array_of(only_a)))
    torch.testing.assert_close(only_a(uniform).values(), given[:56].view(7, 8)[uniform.values()])
    fuse_tables(robe, SparseOptimizer(name="sgd", lr=0.1))
    torch.testing.assert_close(robe(batch()).values(), full(batch()).values(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_hashed_read_and_gradient_equal_the_per_id_definition(block_size: int) -> None:
    torch.manual_seed(0)
    emb = build_embedding("robe", TABLES, array_size=96, block_size=block_size, seed=3)
    kjt = batch(size=7, max_len=3, seed=4)
    out = emb(kjt).to_dict()
    reference_array = array_of(emb).detach().clone().requires_grad_()
    expected = reference_pooled(emb, reference_array, kjt)
    grads = {f: torch.randn_like(v) for f, v in out.items()}
    sum((out[f] * grads[f]).sum() for f in out).backward()
    sum((expected[f] * grads[f]).sum() for f in expected).backward()
    for f in out:
        torch.testing.assert_close(out[f], expected[f].detach())
    torch.testing.assert_close(array_of(emb).grad, reference_array.grad)


def test_the_fused_update_touches_only_the_rows_read() -> None:
    """The array trains sparsely: one fused step changes exactly the rows the batch read, nothing else."""
    tables = [EmbeddingBagConfig(name="t", num_embeddings=100_000, embedding_dim=16, feature_names=["f"])]
    emb = build_embedding("robe", tables, array_size=40_000, block_size=2)
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([5, 77, 90_001]), lengths=torch.tensor([1, 2]))
    read = torch.unique(emb.physical_rows(kjt)["f"])
    fuse_tables(emb, SparseOptimizer(name="adagrad", lr=0.5))
    before = array_of(emb).detach().clone()
    emb(kjt).values().sum().backward()
    changed = torch.nonzero((array_of(emb).detach() != before).any(1)).flatten()
    assert changed.numel() > 0 and set(changed.tolist()) <= set(read.tolist())


def test_block_slots_are_pinned_across_versions() -> None:
    """A change here re-maps every trained array: it must be deliberate."""
    tables = [EmbeddingBagConfig(name="t", num_embeddings=2**40, embedding_dim=4, feature_names=["f"])]
    emb = build_embedding("robe", tables, array_size=1000)
    assert [emb.reference_slots("f", x) for x in (0, 1, 2**39)] == PINNED_SLOTS


#: block 0 of ids 0 and 1 lands where ``hash`` puts them (the same seeded SplitMix64, seed 0, 1000 buckets)
PINNED_SLOTS = [
    [(727, -1), (700, 1), (679, 1), (636, -1)],
    [(657, -1), (711, -1), (782, -1), (235, 1)],
    [(315, -1), (99, -1), (409, -1), (759, -1)],
]


def test_slots_spread_evenly_and_signs_are_balanced() -> None:
    tables = [EmbeddingBagConfig(name="t", num_embeddings=200_000, embedding_dim=4, feature_names=["f"])]
    emb = build_embedding("robe", tables, array_size=1000)  # 1000 slots
    ids = torch.arange(200_000)
    kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(200_000, dtype=torch.long))
    slots, negative = emb._slots(kjt)
    counts = torch.bincount(slots.flatten(), minlength=1000).double()
    assert counts.mean().item() == pytest.approx(800.0)
    assert counts.var().item() == pytest.approx(800.0 * (1 - 1e-3), rel=0.1)  # binomial load per slot
    assert negative is not None and abs(negative.double().mean().item() - 0.5) < 0.005
    assert (slots[0] == slots[1]).double().mean().item() < 0.005  # blocks hash independently


def test_budget_solver_takes_the_largest_array_that_fits_and_reaches_1000x_and_beyond() -> None:
    tables = default_tables()
    for ratio, block_size in ((10, 1), (1000, 1), (10_000, 4), (30_000, 8)):
        emb = build_embedding("robe", tables, budget=Budget(ratio=ratio), block_size=block_size, device="meta")
        allowed = Budget(ratio=ratio).max_bytes(tables)
        width = math.lcm(block_size, 4)
        assert emb.memory_bytes() <= allowed < emb.array_bytes(tables, emb.array_size + width, block_size)
        assert emb.compression_ratio() == pytest.approx(ratio, rel=0.01)
    full = build_embedding("robe", tables, budget=Budget(ratio=1), device="meta")
    assert full.array_size == full_bytes(tables) // 4 - 8 * 26 * 16 // 4  # the values the seeds leave room for


def test_unreachable_budget_names_the_reachable_range_and_the_smallest_budget() -> None:
    tables = default_tables()
    smallest = ROBEEmbedding.array_bytes(tables, 4, 1)
    assert smallest == 4 * 4 + 8 * 26 * 16
    with pytest.raises(
        ValueError, match=rf"'robe' cannot fit .* reaches ratios 1x to .*x .* at least {smallest} bytes"
    ):
        build_embedding("robe", tables, budget=Budget(bytes=smallest - 1), device="meta")
    assert build_embedding("robe", tables, budget=Budget(bytes=smallest), device="meta").array_size == 4


def test_memory_formula_by_hand() -> None:
    emb = build_embedding("robe", TABLES, array_size=96, block_size=2)
    assert emb.memory_bytes() == 96 * 4 + 8 * len(TABLES) * 16 // 2
    stored = sum(t.numel() * t.element_size() for t in emb.to_serving().state_dict().values())
    assert stored == emb.memory_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"array_size": 96, "block_size": 3}, "block_size >= 1 dividing every embedding_dim"),
        ({"array_size": 96, "block_size": 0}, "block_size >= 1 dividing every embedding_dim"),
        ({"array_size": 98, "block_size": 2}, r"array_size a positive multiple of 4 .*array_size=96"),
        ({"array_size": 12, "block_size": 8}, r"multiple of 8 .*got 12\).*array_size=8"),
        ({"array_size": 0}, "array_size a positive multiple of 4"),
        ({"array_size": 96, "hash": "md5"}, "hash='md5' .*must be one of 'splitmix64', 'identity'"),
    ],
)
def test_option_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_embedding("robe", TABLES, **options)


def test_a_budget_with_a_block_size_that_does_not_divide_the_dims_is_the_option_error() -> None:
    with pytest.raises(ValueError, match="block_size >= 1 dividing"):
        build_embedding("robe", TABLES, budget=Budget(ratio=2), block_size=3)


def test_identity_rejects_ids_past_the_cardinality_and_hashing_takes_them() -> None:
    kjt = KeyedJaggedTensor(keys=["fa"], values=torch.tensor([7]), lengths=torch.tensor([1]))
    identity = build_embedding("robe", TABLES[:1], array_size=56, hash="identity")
    with pytest.raises(ValueError, match="'fa'"):
        identity(kjt)
    assert torch.isfinite(build_embedding("robe", TABLES[:1], array_size=56)(kjt).values()).all()

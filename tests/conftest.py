"""Shared fixtures: small tables, KJTs and a tiny synthetic dataset (generated once per session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.data import SyntheticConfig, generate_synthetic
from recsys_embed.methods import Budget, method_class

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_SYNTHETIC = SyntheticConfig(
    train_rows=6000, val_rows=1500, test_rows=1500, num_sparse=4, num_dense=3, max_cardinality=2000, seed=3
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated data goes to a temporary cache, never to the user's home."""
    monkeypatch.setenv("RECSYS_EMBED_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_synthetic")
    generate_synthetic(folder, TINY_SYNTHETIC)
    return folder


#: the ratio each method is built at on the small test tables (mde cannot go below dim 4 on dim-8 tables; dhe's
#: 1024 hashes alone take a third of these tables' bytes; alpt's 8-bit rows with a step per row reach 2.67x at dim 8)
TEST_RATIO = {"full": 1.0, "mde": 1.5, "dhe": 1.5, "alpt": 2.5}
#: methods whose integer rows are updated inside backward by the method (as fused tables are by fbgemm): no
#: parameter of theirs gets a gradient, so gradient tests check that backward changed the stored rows instead
UPDATED_IN_BACKWARD = {
    "quant": "integer rows, updated with stochastic rounding inside backward",
    "alpt": "integer rows and step sizes, updated inside backward",
}
# options a method needs on tables of a few dozen ids (1024 DHE hashes' parameters outweigh such tables, and so does
# an MGQE codebook of 256 centroids: its ceiling there is 1.5x)
SMALL_TABLE_OPTIONS: dict[str, dict[str, object]] = {
    "dhe": {"num_hashes": 64},
    "mgqe": {"high_centroids": 16, "low_centroids": 4},
}


def budget_for(name: str, default: float = 4.0) -> Budget:
    """The budget a registered method is built with in the registry-wide tests."""
    return Budget(ratio=TEST_RATIO.get(name, default))


def make_tables(cards: tuple[int, ...] = (7, 50, 3000), dim: int = 8) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=dim, feature_names=[f"f{i}"])
        for i, n in enumerate(cards)
    ]


def random_kjt(
    tables: list[EmbeddingBagConfig], batch: int, *, max_len: int = 3, seed: int = 0, allow_empty: bool = True
) -> KeyedJaggedTensor:
    """A KJT with 0..max_len ids per bag (feature-major), ids inside each table's range."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for t in tables:
        low = 0 if allow_empty else 1
        lens = torch.randint(low, max_len + 1, (batch,), generator=g)
        lengths.append(lens)
        values.append(torch.randint(0, t.num_embeddings, (int(lens.sum()),), generator=g))
    return KeyedJaggedTensor(
        keys=[t.feature_names[0] for t in tables],
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        stride=batch,
    )


def zipf_counts(tables: list[EmbeddingBagConfig], seed: int = 0) -> dict[str, np.ndarray]:
    """Zipf-like id counts for every feature (for frequency-aware methods)."""
    rng = np.random.default_rng(seed)
    return {
        f: rng.permutation(np.round(1000.0 / np.arange(1, t.num_embeddings + 1)).astype(np.int64))
        for t in tables
        for f in t.feature_names
    }


def method_options(name: str, tables: list[EmbeddingBagConfig]) -> dict[str, object]:
    """Extra options a registered method needs to build on test tables (e.g. id counts)."""
    return {"id_counts": zipf_counts(tables)} if method_class(name).needs_id_counts else {}

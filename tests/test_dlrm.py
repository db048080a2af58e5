"""DLRM: shapes, any TorchRec-compatible embedding module, dims check, training through CTRTask."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection

from recsys_embed.methods import build_embedding
from recsys_embed.models import DLRM
from recsys_embed.models.layers import DotInteraction
from tests.conftest import make_tables, random_kjt


def test_shapes_with_a_method_and_with_a_plain_torchrec_ebc() -> None:
    tables = make_tables(dim=8)
    kjt = random_kjt(tables, batch=5)
    for embedding in (build_embedding("full", tables), EmbeddingBagCollection(tables=tables)):
        model = DLRM(embedding, num_dense=4, bottom_mlp=[16], top_mlp=[8])
        assert model(torch.randn(5, 4), kjt).shape == (5,)
    no_dense = DLRM(build_embedding("full", tables), num_dense=0)
    assert no_dense(torch.zeros(5, 0), kjt).shape == (5,)


def test_interaction_is_the_upper_triangle_of_pairwise_dots() -> None:
    vectors = torch.randn(2, 3, 4)
    got = DotInteraction(3)(vectors)
    expected = torch.stack([(vectors[:, i] * vectors[:, j]).sum(-1) for i, j in [(0, 1), (0, 2), (1, 2)]], dim=1)
    torch.testing.assert_close(got, expected)


def test_mixed_dims_are_rejected() -> None:
    tables = make_tables((5,), dim=4) + [
        type(make_tables()[0])(name="t9", num_embeddings=5, embedding_dim=8, feature_names=["g"])
    ]
    with pytest.raises(ValueError, match="one embedding_dim"):
        DLRM(build_embedding("full", tables), num_dense=1)

"""DLRM: shapes, any TorchRec-compatible embedding module, TorchRec's layers against a hand computation, dims check."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection

from recsys_embed.methods import build_embedding
from recsys_embed.models import DLRM
from recsys_embed.models.layers import mlp
from tests.conftest import make_tables, random_kjt


def test_shapes_with_a_method_and_with_a_plain_torchrec_ebc() -> None:
    tables = make_tables(dim=8)
    kjt = random_kjt(tables, batch=5)
    for embedding in (build_embedding("full", tables), EmbeddingBagCollection(tables=tables)):
        model = DLRM(embedding, num_dense=4, bottom_mlp=[16], top_mlp=[8])
        assert model(torch.randn(5, 4), kjt).shape == (5,)
    no_dense = DLRM(build_embedding("full", tables), num_dense=0)
    assert no_dense(torch.zeros(5, 0), kjt).shape == (5,)


def _linear_layers(tower: nn.Module) -> list[nn.Linear]:
    return [m for m in tower.modules() if isinstance(m, nn.Linear)]


def _relu_stack(x: torch.Tensor, layers: list[nn.Linear], *, relu_last: bool) -> torch.Tensor:
    for i, layer in enumerate(layers):
        x = x @ layer.weight.T + layer.bias
        x = x.relu() if relu_last or i < len(layers) - 1 else x
    return x


def _pairwise_dots(vectors: list[torch.Tensor]) -> torch.Tensor:
    n = len(vectors)
    return torch.stack([(vectors[i] * vectors[j]).sum(1) for i in range(n) for j in range(i + 1, n)], dim=1)


@pytest.mark.parametrize("num_dense", [4, 0])
def test_torchrec_layers_compute_dlrm_by_hand(num_dense: int) -> None:
    """The TorchRec MLPs and InteractionArch give DLRM's function: bottom Linear-ReLU stack, the upper triangle of
    the dot products of (bottom, e_1, ..., e_F) after the bottom output, top stack without a last ReLU."""
    torch.manual_seed(0)
    tables = make_tables(dim=8)
    kjt = random_kjt(tables, batch=5)
    model = DLRM(build_embedding("full", tables), num_dense=num_dense, bottom_mlp=[16], top_mlp=[8, 6])
    dense = torch.randn(5, num_dense)
    pooled = model.embedding(kjt)
    fields = [pooled[k] for k in model.keys]
    if num_dense:
        bottom = _relu_stack(dense, _linear_layers(model.bottom), relu_last=True)
        top_in = torch.cat([bottom, _pairwise_dots([bottom, *fields])], dim=1)
    else:
        top_in = _pairwise_dots(fields)
    expected = _relu_stack(top_in, _linear_layers(model.top), relu_last=False).squeeze(1)
    torch.testing.assert_close(model(dense, kjt), expected)


def test_dlrm_towers_start_as_the_earlier_linear_relu_stacks() -> None:
    """TorchRec's MLP draws nn.Linear's init layer by layer, as the earlier mlp() did: seeded runs are unchanged."""
    tables = make_tables(dim=8)
    torch.manual_seed(1)
    model = DLRM(build_embedding("full", tables), num_dense=4, bottom_mlp=[16], top_mlp=[8])
    torch.manual_seed(1)
    build_embedding("full", tables)
    # the bottom 4 -> 16 -> D = 8; the top over the 6 dots of 4 vectors and the bottom output
    earlier = [*mlp(4, [16, 8]), *mlp(6 + 8, [8, 1], last_activation=False)]
    earlier_weights = [p for m in earlier for p in m.parameters()]
    weights = [p for tower in (model.bottom, model.top) for p in tower.parameters()]
    assert len(weights) == len(earlier_weights) == 8
    assert all(torch.equal(a, b) for a, b in zip(weights, earlier_weights))


def test_mixed_dims_are_rejected() -> None:
    tables = make_tables((5,), dim=4) + [
        type(make_tables()[0])(name="t9", num_embeddings=5, embedding_dim=8, feature_names=["g"])
    ]
    with pytest.raises(ValueError, match="one embedding_dim"):
        DLRM(build_embedding("full", tables), num_dense=1)

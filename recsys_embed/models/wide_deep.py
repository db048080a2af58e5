"""Wide & Deep (Cheng et al., DLRS'16, "Wide & Deep Learning for Recommender Systems")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys_embed.models.layers import EmbeddingFields, FieldLinear, flat_embeddings, mlp, with_dense


class WideDeep(nn.Module):
    """Wide & Deep: a linear ("wide") model and an MLP ("deep") trained jointly, their logits summed.

    Idea: ``logit = wide(x) + MLP([e_1, ..., e_F, x_dense])``; the wide part memorises, the deep part generalises
    through the embeddings.

    The wide part under an embedding budget (a documented deviation from the paper): the paper's wide model is a
    linear model over sparse one-hot ids and hand-made cross-product features, i.e. one weight per id (and per id
    pair): hidden tables as large as the embeddings, which would escape the memory budget. Here it is linear over
    the (possibly compressed) field embeddings and the raw dense features, ``sum_f <w_f, e_f> + <w, x_dense> + b``
    (:class:`FieldLinear`): the weight of an id is tied to its embedding, with one vector ``w_f`` per field and no
    parameter per id. Cross-product features are left out (they would be tables of id pairs).

    Tables may have different embedding dims (the fields are concatenated); ``num_dense == 0`` is supported.

    Shapes: dense ``(B, num_dense)``, sparse KJT with the tables' features -> logits ``(B,)``.

    Args:
        embedding: module with ``embedding_bag_configs()`` and ``forward(KJT) -> KeyedTensor`` (a
            ``recsys_embed`` method or a TorchRec ``EmbeddingBagCollection``).
        num_dense: number of dense input features (0 for none).
        deep_mlp: hidden sizes of the deep part; a last layer of size 1 is added. Default ``(256, 128)``, small
            enough for 2 CPU cores (the paper used ``(1024, 512, 256)`` for Google Play; BARS tunes
            ``(400, 400, 400)``-class towers on Criteo).
        dropout: dropout after each hidden layer of the deep part.
        batch_norm: batch norm in each hidden layer of the deep part.

    Example::

        model = WideDeep(build_embedding("full", tables), num_dense=13, deep_mlp=(256, 128))
        logits = model(dense, kjt)  # (B,)
    """

    def __init__(
        self,
        embedding: nn.Module,
        num_dense: int,
        *,
        deep_mlp: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.fields = EmbeddingFields.of(embedding)
        self.num_dense = num_dense
        width = self.fields.total_dim + num_dense
        self.wide = FieldLinear(width)
        self.deep = mlp(width, [*deep_mlp, 1], last_activation=False, dropout=dropout, batch_norm=batch_norm)

    def inputs(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flattened field embeddings ``(B, sum d_f)`` and the wide/deep input (with the dense features)."""
        flat = flat_embeddings(self.embedding(sparse), self.fields.keys)
        return flat, with_dense(flat, dense, self.num_dense)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        _, inputs = self.inputs(dense, sparse)
        return self.wide(inputs) + self.deep(inputs).squeeze(1)

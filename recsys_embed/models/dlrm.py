"""DLRM (Naumov et al., 2019, "Deep Learning Recommendation Model for Personalization and Recommendation Systems").

Shapes: dense ``(B, num_dense)`` -> bottom MLP -> ``(B, D)``; the embedding module maps the KJT to ``F`` pooled
vectors ``(B, F, D)``; the dot interaction of the ``F + 1`` vectors gives ``(B, (F + 1) F / 2)``, concatenated with
the bottom output and fed to the top MLP -> one logit ``(B,)``. All tables must share one dim ``D``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys_embed.models.layers import DotInteraction, EmbeddingFields, mlp, stacked_embeddings


class DLRM(nn.Module):
    """DLRM over any TorchRec-compatible embedding module (a ``recsys_embed`` method or an EBC).

    Args:
        embedding: module with ``embedding_bag_configs()`` and ``forward(KJT) -> KeyedTensor``.
        num_dense: number of dense input features (0 for none).
        bottom_mlp: hidden sizes of the dense MLP; a last layer of size ``D`` is added.
        top_mlp: hidden sizes of the top MLP; a last layer of size 1 is added.

    Example::

        model = DLRM(build_embedding("full", tables), num_dense=13)
        logits = model(dense, kjt)  # (B,)
    """

    def __init__(
        self,
        embedding: nn.Module,
        num_dense: int,
        *,
        bottom_mlp: Sequence[int] = (128, 64),
        top_mlp: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__()
        fields = EmbeddingFields.of(embedding)
        self.embedding = embedding
        self.dim = fields.common_dim("DLRM")
        self.keys = list(fields.keys)
        self.num_dense = num_dense
        self.bottom = mlp(num_dense, [*bottom_mlp, self.dim]) if num_dense else None
        self.interaction = DotInteraction(len(self.keys) + (1 if num_dense else 0))
        top_in = self.interaction.out_features + (self.dim if num_dense else 0)
        self.top = mlp(top_in, [*top_mlp, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        vectors = stacked_embeddings(self.embedding(sparse), self.keys, self.dim)
        parts = []
        if self.bottom is not None:
            bottom = self.bottom(dense)
            vectors = torch.cat([bottom.unsqueeze(1), vectors], dim=1)
            parts.append(bottom)
        parts.append(self.interaction(vectors))
        return self.top(torch.cat(parts, dim=1)).squeeze(1)

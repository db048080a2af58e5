"""DLRM (Naumov et al., 2019, "Deep Learning Recommendation Model for Personalization and Recommendation Systems").

Shapes: dense ``(B, num_dense)`` -> bottom MLP -> ``(B, D)``; the embedding module maps the KJT to ``F`` pooled
vectors ``(B, F, D)``; the dot interaction of the ``F + 1`` vectors gives ``(B, (F + 1) F / 2)``, concatenated with
the bottom output and fed to the top MLP -> one logit ``(B,)``. All tables must share one dim ``D``.

The layers are TorchRec's: the bottom and top towers are ``torchrec.modules.mlp.MLP`` (``Linear -> ReLU`` stacks,
the top one without a ReLU after its last layer), the interaction is ``torchrec.models.dlrm.InteractionArch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.models.dlrm import InteractionArch
from torchrec.modules.mlp import MLP

from recsys_embed.models.layers import EmbeddingFields, stacked_embeddings


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
        self.bottom = MLP(num_dense, [*bottom_mlp, self.dim]) if num_dense else None
        # InteractionArch(F) takes the bottom output and F fields; without dense features the first field takes the
        # bottom's place (its raw copy at the front of the output is cut off in forward)
        vectors = len(self.keys) + (1 if num_dense else 0)
        self.interaction = InteractionArch(vectors - 1)
        pairs = vectors * (vectors - 1) // 2
        self.top = MLP(pairs + (self.dim if num_dense else 0), [*top_mlp, 1], activation_on_last=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        vectors = stacked_embeddings(self.embedding(sparse), self.keys, self.dim)
        if self.bottom is not None:  # [bottom, the pairwise dots of (bottom, e_1, ..., e_F)]
            top_in = self.interaction(self.bottom(dense), vectors)
        else:  # the pairwise dots of (e_1, ..., e_F)
            top_in = self.interaction(vectors[:, 0], vectors[:, 1:])[:, self.dim :]
        return self.top(top_in).squeeze(1)

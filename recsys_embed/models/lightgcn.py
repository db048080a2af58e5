"""LightGCN (He et al., SIGIR'20, "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation")."""

from __future__ import annotations

import torch

from recsys_embed.methods import EmbeddingMethod
from recsys_embed.models.graph_base import GraphModel


class LightGCN(GraphModel):
    """LightGCN: the mean of the light graph convolutions ``A_hat^k E``, ``k = 0..K``; no feature transform, no
    nonlinearity, no self-loop.

    Idea: ``E^(k+1) = A_hat E^(k)`` with ``A_hat = D^-1/2 A D^-1/2`` over the user-item graph, and the final
    embedding ``E_out = 1/(K+1) sum_k E^(k)`` (the paper's uniform layer weights ``alpha_k``). The only parameters
    are the ego embeddings ``E^(0)``, here any compression method's rows; a step costs ``K`` sparse products
    ``O(K * nnz(A) * d)``. Scores are ``<e_u, e_i>``.

    Args:
        embedding: the compression method over ``graph_tables(num_users, num_items, d)``.
        num_users: ``U``; num_items: ``I``.
        num_layers: ``K`` (the paper: 3).

    Example::

        model = LightGCN(build_embedding("qr", graph_tables(943, 1682, 64), budget=Budget(ratio=10)), 943, 1682)
    """

    def __init__(self, embedding: EmbeddingMethod, num_users: int, num_items: int, *, num_layers: int = 3) -> None:
        super().__init__(embedding, num_users, num_items)
        if num_layers < 0:
            raise ValueError(f"LightGCN num_layers must be >= 0 (got {num_layers}).")
        self.num_layers = num_layers

    def propagate(self, ego: torch.Tensor) -> torch.Tensor:
        adjacency = self.graph() if self.num_layers else None
        total, layer = ego, ego
        for _ in range(self.num_layers):  # over layers, not ids
            layer = torch.sparse.mm(adjacency, layer)
            total = total + layer
        return total / (self.num_layers + 1)

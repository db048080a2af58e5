"""NGCF (Wang et al., SIGIR'19, "Neural Graph Collaborative Filtering")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys_embed.methods import EmbeddingMethod
from recsys_embed.models.graph_base import GraphModel


class NGCF(GraphModel):
    """NGCF: embedding propagation with feature transforms, an element-wise affinity term and LeakyReLU; the
    layers' outputs are concatenated.

    Idea (the paper's matrix form, eq. 7): ``E^(l) = LeakyReLU((A_hat + I) E^(l-1) W1 + (A_hat E^(l-1)) ⊙ E^(l-1)
    W2)`` (with biases, slope 0.2), then message dropout on ``E^(l)``; the final embedding is
    ``[E^(0) | E^(1) | ... | E^(L)]``, each propagated layer L2-normalised per row as the authors' code does.
    Node dropout (training only) blocks a random share of nodes: every message a dropped node sends is removed
    (its column of ``A_hat``), the kept ones scaled by ``1 / (1 - p)``. Dense parameters:
    ``L * 2 * (d * d + d)`` floats (replicated, outside the embedding budget).

    Args:
        embedding: the compression method over ``graph_tables(num_users, num_items, d)``.
        num_users: ``U``; num_items: ``I``.
        num_layers: ``L`` (the paper: 3, each of size ``d``).
        message_dropout: dropout on each layer's output (the paper: 0.1).
        node_dropout: share of nodes whose messages are dropped per step (the paper tunes it in [0, 0.8]).
        negative_slope: LeakyReLU slope (0.2).

    Example::

        model = NGCF(build_embedding("full", graph_tables(943, 1682, 64)), 943, 1682, message_dropout=0.1)
    """

    def __init__(
        self,
        embedding: EmbeddingMethod,
        num_users: int,
        num_items: int,
        *,
        num_layers: int = 3,
        message_dropout: float = 0.1,
        node_dropout: float = 0.0,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__(embedding, num_users, num_items)
        for name, p in (("message_dropout", message_dropout), ("node_dropout", node_dropout)):
            if not 0 <= p < 1:
                raise ValueError(f"NGCF {name} must be in [0, 1) (got {p}).")
        if num_layers < 1:
            raise ValueError(f"NGCF num_layers must be >= 1 (got {num_layers}).")
        d = self.embedding_dim
        self.num_layers = num_layers
        self.sum_transforms = nn.ModuleList(nn.Linear(d, d) for _ in range(num_layers))  # W1
        self.product_transforms = nn.ModuleList(nn.Linear(d, d) for _ in range(num_layers))  # W2
        self.message_dropout, self.node_dropout, self.negative_slope = message_dropout, node_dropout, negative_slope
        for linear in [*self.sum_transforms, *self.product_transforms]:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def output_dim(self) -> int:
        return self.embedding_dim * (self.num_layers + 1)

    def _dropped_graph(self) -> torch.Tensor:
        adjacency = self.graph()
        if not self.training or self.node_dropout == 0:
            return adjacency
        nodes = adjacency.shape[0]
        keep = (torch.rand(nodes, device=adjacency.device) >= self.node_dropout).to(adjacency.dtype)
        indices = adjacency.indices()
        values = adjacency.values() * keep[indices[1]] / (1 - self.node_dropout)
        return torch.sparse_coo_tensor(indices, values, adjacency.shape, is_coalesced=True, check_invariants=False)

    def propagate(self, ego: torch.Tensor) -> torch.Tensor:
        adjacency = self._dropped_graph()
        layer, outputs = ego, [ego]
        for w1, w2 in zip(self.sum_transforms, self.product_transforms):  # over layers, not ids
            side = torch.sparse.mm(adjacency, layer)
            layer = F.leaky_relu(w1(side + layer) + w2(side * layer), self.negative_slope)
            layer = F.dropout(layer, self.message_dropout, self.training)
            outputs.append(F.normalize(layer, dim=1))
        return torch.cat(outputs, dim=1)

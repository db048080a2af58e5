"""The base of the graph collaborative-filtering models (LightGCN, NGCF, MF-BPR): tables, graph and all-rows read.

A graph model propagates user and item embeddings over the normalised bipartite graph ``A_hat = D^-1/2 A D^-1/2``
(``U + I`` nodes, users first; see :mod:`recsys_embed.data.graph`). The embeddings come from any registered
compression method, in one of two table layouts (:func:`graph_tables`):

- two logical tables, features ``user`` (``U`` ids) and ``item`` (``I`` ids); or
- one logical table, feature ``node`` (``U + I`` ids), items at offset ``U``.

Each step reads every row once through the method's batched all-rows lookup
(:meth:`~recsys_embed.methods.EmbeddingMethod.all_embeddings`), so a hashed, QR, TT or DHE table is materialised
once per step and the gradients of the propagated embeddings flow back into its storage (fused rows included).

Example::

    emb = build_embedding("hash", graph_tables(943, 1682, 64), budget=Budget(ratio=10))
    model = LightGCN(emb, num_users=943, num_items=1682, num_layers=3)
    model.set_graph(graph.normalized_adjacency())
    users, items, ego = model()  # (U, d_out), (I, d_out), (U + I, d)
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagConfig

from recsys_embed.methods import EmbeddingMethod

USER, ITEM, NODE = "user", "item", "node"


def graph_tables(num_users: int, num_items: int, dim: int, *, shared: bool = False) -> list[EmbeddingBagConfig]:
    """The logical tables of a graph model: ``user`` and ``item``, or one ``node`` table (``shared``)."""
    if shared:
        nodes = num_users + num_items
        return [EmbeddingBagConfig(name=NODE, num_embeddings=nodes, embedding_dim=dim, feature_names=[NODE])]
    return [
        EmbeddingBagConfig(name=USER, num_embeddings=num_users, embedding_dim=dim, feature_names=[USER]),
        EmbeddingBagConfig(name=ITEM, num_embeddings=num_items, embedding_dim=dim, feature_names=[ITEM]),
    ]


class GraphModel(nn.Module):
    """Ego embeddings of every node from ``embedding``, propagated by :meth:`propagate` (subclasses).

    Args:
        embedding: a compression method over :func:`graph_tables` (two tables or one shared one).
        num_users: ``U``; num_items: ``I`` (the CLI links both from the data).
    """

    def __init__(self, embedding: EmbeddingMethod, num_users: int, num_items: int) -> None:
        super().__init__()
        if not isinstance(embedding, EmbeddingMethod):
            raise ValueError(
                "Graph models need a recsys_embed compression method (for its all-rows lookup), got "
                f"{type(embedding).__name__}."
            )
        tables = {f: t.num_embeddings for t in embedding.embedding_bag_configs() for f in t.feature_names}
        two = {USER: num_users, ITEM: num_items}
        one = {NODE: num_users + num_items}
        if tables not in (two, one):
            raise ValueError(
                f"Graph model tables must be features {two} (two tables) or {one} (one shared table), got {tables}: "
                "build the method over graph_tables(num_users, num_items, dim)."
            )
        dims = {t.embedding_dim for t in embedding.embedding_bag_configs()}
        if len(dims) != 1:
            raise ValueError(f"User and item tables need one embedding dim, got {sorted(dims)}.")
        self.embedding = embedding
        self.num_users, self.num_items = num_users, num_items
        self.embedding_dim = dims.pop()
        self.shared = tables == one
        self.register_buffer("adjacency", None, persistent=False)

    @property
    def output_dim(self) -> int:
        """Dim of the propagated embeddings (scores are their dot products)."""
        return self.embedding_dim

    def set_graph(self, adjacency: torch.Tensor) -> None:
        """Use ``adjacency`` (``(U + I, U + I)`` sparse, normalised) for propagation; not saved in checkpoints."""
        nodes = self.num_users + self.num_items
        if tuple(adjacency.shape) != (nodes, nodes) or not adjacency.is_sparse:
            raise ValueError(
                f"The adjacency must be a sparse ({nodes}, {nodes}) tensor (users then items), got "
                f"{'sparse' if adjacency.is_sparse else 'dense'} {tuple(adjacency.shape)}: does the data match "
                "num_users/num_items?"
            )
        device = next(iter(self.parameters()), torch.empty(0)).device
        self.adjacency = adjacency.coalesce().to(device)

    def graph(self) -> torch.Tensor:
        if self.adjacency is None:
            raise ValueError(
                f"{type(self).__name__} has no graph: call set_graph(adjacency) first (GraphTask does it from "
                "its GraphDataModule)."
            )
        return self.adjacency

    def ego(self) -> torch.Tensor:
        """``(U + I, d)``: every user's then every item's row, read in one batched all-rows call per table."""
        if self.shared:
            return self.embedding.all_embeddings(NODE)
        return torch.cat([self.embedding.all_embeddings(USER), self.embedding.all_embeddings(ITEM)])

    def propagate(self, ego: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``(U + I, d) -> (U + I, output_dim)``: the final node embeddings."""
        raise NotImplementedError

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(users (U, output_dim), items (I, output_dim), ego (U + I, d))``."""
        ego = self.ego()
        out = self.propagate(ego)
        return out[: self.num_users], out[self.num_users :], ego

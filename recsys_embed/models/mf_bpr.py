"""MF-BPR (Rendle et al., UAI'09, "BPR: Bayesian Personalized Ranking from Implicit Feedback"): the baseline."""

from __future__ import annotations

import torch

from recsys_embed.models.graph_base import GraphModel


class MFBPR(GraphModel):
    """Matrix factorisation trained with BPR: the ego embeddings are the final ones (no propagation).

    Idea: ``score(u, i) = <e_u, e_i>`` with ``e`` the rows of the (compressed) user and item tables; the graph is
    not used, so no adjacency is needed. The baseline LightGCN and NGCF compare against at the same dim.

    Example::

        model = MFBPR(build_embedding("full", graph_tables(943, 1682, 64)), num_users=943, num_items=1682)
    """

    def propagate(self, ego: torch.Tensor) -> torch.Tensor:
        return ego

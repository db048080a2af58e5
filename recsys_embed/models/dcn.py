"""DCN (Wang et al., ADKDD'17, "Deep & Cross Network for Ad Click Predictions") and DCN-v2 (Wang et al., WWW'21,
"DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to Rank Systems").

Both build ``x0 = [e_1, ..., e_F, x_dense]`` of width ``d = sum_f d_f + num_dense`` (mixed embedding dims are
fine: the fields are concatenated), run a cross network (:mod:`recsys_embed.models.cross`) and a deep MLP, and map
the result to one logit. The cross networks are TorchRec's (``VectorCrossNet``, ``CrossNet``, ``LowRankCrossNet``);
the deep MLP is :func:`~recsys_embed.models.layers.mlp` (TorchRec's ``MLP`` has no batch norm or dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys_embed.models.cross import dcn_cross, dcnv2_cross
from recsys_embed.models.layers import EmbeddingFields, flat_embeddings, mlp, mlp_out_features, with_dense

Structure = Literal["stacked", "parallel"]


class _CrossAndDeep(nn.Module):
    """``x0 -> cross network`` and ``MLP``, stacked (``MLP(cross(x0))``) or parallel (``[cross(x0), MLP(x0)]``),
    then ``Linear(., 1)``."""

    def __init__(
        self,
        embedding: nn.Module,
        num_dense: int,
        cross: nn.Module,
        *,
        structure: Structure,
        deep_mlp: Sequence[int],
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"structure must be 'stacked' or 'parallel' (got {structure!r}).")
        self.embedding = embedding
        self.fields = EmbeddingFields.of(embedding)
        self.num_dense = num_dense
        self.structure = structure
        width = self.in_features
        self.cross = cross
        self.deep = mlp(width, deep_mlp, dropout=dropout, batch_norm=batch_norm)
        deep_out = mlp_out_features(width, deep_mlp)
        self.head = nn.Linear(deep_out if structure == "stacked" else width + deep_out, 1)

    @property
    def in_features(self) -> int:
        """Width ``d`` of ``x0``: the concatenated embeddings and dense features."""
        return self.fields.total_dim + self.num_dense

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        x0 = with_dense(flat_embeddings(self.embedding(sparse), self.fields.keys), dense, self.num_dense)
        if self.structure == "stacked":
            out = self.deep(self.cross(x0))
        else:
            out = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.head(out).squeeze(1)


class DCN(_CrossAndDeep):
    """Deep & Cross Network: a rank-one cross network and an MLP side by side, concatenated into one logit.

    Idea: the cross network ``x_{l+1} = x0 * (x_l . w_l) + b_l + x_l`` (TorchRec's ``VectorCrossNet``, see
    :func:`~recsys_embed.models.cross.dcn_cross`) learns bounded-degree feature crosses with ``2 d`` parameters per
    layer; the MLP learns implicit ones; ``logit = Linear([x_L, MLP(x0)])``.

    Input ``x0 = [e_1, ..., e_F, x_dense]``: raw dense features are concatenated (as in the paper); tables may have
    different embedding dims; ``num_dense == 0`` is supported. No first-order per-id weights are used.

    Shapes: dense ``(B, num_dense)``, sparse KJT with the tables' features -> logits ``(B,)``.

    Args:
        embedding: module with ``embedding_bag_configs()`` and ``forward(KJT) -> KeyedTensor`` (a
            ``recsys_embed`` method or a TorchRec ``EmbeddingBagCollection``).
        num_dense: number of dense input features (0 for none).
        num_cross_layers: cross layers ``L`` (BARS Criteo: 3).
        deep_mlp: hidden sizes of the deep MLP (may be empty: cross network only). Default ``(256, 128)``, small
            enough for 2 CPU cores; BARS tunes ``(400, 400, 400)`` on Criteo.
        dropout: dropout after each hidden layer of the MLP (BARS Criteo: 0.1).
        batch_norm: batch norm in each hidden layer of the MLP.

    Example::

        model = DCN(build_embedding("full", tables), num_dense=13, num_cross_layers=3)
        logits = model(dense, kjt)  # (B,)
    """

    def __init__(
        self,
        embedding: nn.Module,
        num_dense: int,
        *,
        num_cross_layers: int = 3,
        deep_mlp: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        width = EmbeddingFields.of(embedding).total_dim + num_dense
        super().__init__(
            embedding,
            num_dense,
            dcn_cross(width, num_cross_layers),
            structure="parallel",
            deep_mlp=deep_mlp,
            dropout=dropout,
            batch_norm=batch_norm,
        )


class DCNv2(_CrossAndDeep):
    """DCN-v2: a matrix cross network (full or low rank) with an MLP, stacked or in parallel.

    Idea: the cross layer ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` (TorchRec's ``CrossNet`` / ``LowRankCrossNet``,
    see :func:`~recsys_embed.models.cross.dcnv2_cross`) is far more expressive than DCN's rank-one one; with
    ``low_rank=r`` the paper's cost-efficient ``W_l = U_l V_l^T`` uses ``2 d r`` weights instead of ``d^2``.
    ``structure="stacked"``: ``logit = Linear(MLP(x_L))``; ``"parallel"``: ``logit = Linear([x_L, MLP(x0)])``.
    The paper's mixture of low-rank experts (DCN-Mix) is not implemented.

    Input ``x0 = [e_1, ..., e_F, x_dense]``: as in the paper's embedding layer the field embeddings are concatenated,
    so no common dim is needed and tables may have different embedding dims; the dense features are concatenated
    as they come (the paper assumes them normalised; the data scripts' transform decides); ``num_dense == 0`` is
    supported. No first-order per-id weights are used.

    Shapes: dense ``(B, num_dense)``, sparse KJT with the tables' features -> logits ``(B,)``.

    Args:
        embedding: module with ``embedding_bag_configs()`` and ``forward(KJT) -> KeyedTensor`` (a
            ``recsys_embed`` method or a TorchRec ``EmbeddingBagCollection``).
        num_dense: number of dense input features (0 for none).
        num_cross_layers: cross layers ``L`` (BARS Frappe: 4).
        low_rank: ``None`` for full-rank ``W_l``; a rank ``r`` for ``W_l = U_l V_l^T``.
        structure: ``"parallel"`` (default, as FuxiCTR/BARS) or ``"stacked"``; the paper reports both.
        deep_mlp: hidden sizes of the MLP (may be empty: cross network only when stacked). Default ``(256, 128)``,
            small enough for 2 CPU cores; BARS tunes ``(400, 400, 400)`` on Frappe.
        dropout: dropout after each hidden layer of the MLP (BARS Frappe: 0.4).
        batch_norm: batch norm in each hidden layer of the MLP (BARS: on).

    Example::

        model = DCNv2(build_embedding("full", tables), num_dense=13, low_rank=16, structure="stacked")
        logits = model(dense, kjt)  # (B,)
    """

    def __init__(
        self,
        embedding: nn.Module,
        num_dense: int,
        *,
        num_cross_layers: int = 3,
        low_rank: int | None = None,
        structure: Structure = "parallel",
        deep_mlp: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        width = EmbeddingFields.of(embedding).total_dim + num_dense
        super().__init__(
            embedding,
            num_dense,
            dcnv2_cross(width, num_cross_layers, low_rank=low_rank),
            structure=structure,
            deep_mlp=deep_mlp,
            dropout=dropout,
            batch_norm=batch_norm,
        )

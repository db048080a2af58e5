"""DeepFM (Guo et al., IJCAI'17, "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys_embed.models.layers import DenseProjection, fm_interaction
from recsys_embed.models.wide_deep import WideDeep


class DeepFM(WideDeep):
    """DeepFM: a factorization machine and a deep MLP over the same field embeddings, their logits summed.

    Idea: ``logit = first_order + sum_{i<j} <v_i, v_j> + MLP([e_1, ..., e_F, x_dense])``. The FM part models
    pairwise crosses explicitly, the MLP higher-order ones; unlike Wide&Deep both share the embeddings, so no
    feature engineering is needed.

    Choices under an embedding budget (documented deviations from the paper):

    - **First order**: the paper's FM keeps a scalar weight per id (a hidden one-dim table). Here it is
      :class:`WideDeep`'s wide part (DeepFM is Wide&Deep plus the FM term): the weight of an id is tied to its
      embedding, ``<w_f, e_f>`` with one learned vector ``w_f`` per field (:class:`FieldLinear`),
      plus a linear term on the raw dense features: no parameter per id, so the embedding module's
      ``memory_bytes()`` stays the model's whole id-dependent memory.
    - **Dense features** (``num_dense > 0``): projected to one more ``D``-vector field ``sum_j x_j v_j``
      (:class:`DenseProjection`, no bias) that joins the FM's pairwise terms, so each dense feature interacts with
      each categorical field as in an FM over real-valued inputs; the raw dense values are also concatenated to the
      MLP input. ``num_dense == 0`` is supported.
    - The FM needs one embedding dim ``D`` for all tables (a ``ValueError`` otherwise).

    Shapes: dense ``(B, num_dense)``, sparse KJT with the tables' features -> logits ``(B,)``.

    Args:
        embedding: module with ``embedding_bag_configs()`` and ``forward(KJT) -> KeyedTensor`` (a
            ``recsys_embed`` method or a TorchRec ``EmbeddingBagCollection``); ``D`` comes from its tables.
        num_dense: number of dense input features (0 for none).
        deep_mlp: hidden sizes of the deep part; a last layer of size 1 is added. Default ``(256, 128)``, small
            enough for 2 CPU cores; BARS tunes ``(400, 400, 400)`` on Criteo and Frappe.
        dropout: dropout after each hidden layer of the deep part (BARS Frappe: 0.2).
        batch_norm: batch norm in each hidden layer of the deep part (BARS: on).

    Example::

        model = DeepFM(build_embedding("hash", tables, budget=Budget(ratio=10)), num_dense=13)
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
        super().__init__(embedding, num_dense, deep_mlp=deep_mlp, dropout=dropout, batch_norm=batch_norm)
        self.dim = self.fields.common_dim("DeepFM")
        self.dense_field = DenseProjection(num_dense, self.dim) if num_dense else None

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        flat, inputs = self.inputs(dense, sparse)
        vectors = flat.reshape(flat.shape[0], self.fields.num_fields, self.dim)
        if self.dense_field is not None:
            vectors = torch.cat([vectors, self.dense_field(dense).unsqueeze(1)], dim=1)
        return self.wide(inputs) + fm_interaction(vectors) + self.deep(inputs).squeeze(1)

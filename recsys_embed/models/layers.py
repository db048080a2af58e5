"""Building blocks shared by the CTR models.

Every model reads its fields from the embedding module (:class:`EmbeddingFields`), flattens the pooled
``KeyedTensor`` into ``(B, sum d_f)`` (:func:`flat_embeddings`) or stacks it into ``(B, F, D)``
(:func:`stacked_embeddings`), and builds its deep towers with :func:`mlp`. First-order ("linear", "wide") terms use
:class:`FieldLinear`, which holds one weight vector per *field* and never a weight per *id*: a per-id weight is one
more embedding table, and it would escape the memory budget that the embedding module is held to.

TorchRec's layers are used where they compute the same function: DLRM's towers and interaction
(``torchrec.modules.mlp.MLP``, ``torchrec.models.dlrm.InteractionArch``) and the cross networks
(:mod:`recsys_embed.models.cross`). The two kept here differ from TorchRec's, as their docstrings say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedTensor


def mlp(
    in_features: int,
    sizes: Sequence[int],
    *,
    last_activation: bool = True,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """``Linear -> [BatchNorm] -> ReLU -> [Dropout]`` stack through ``sizes``.

    The last layer gets the ReLU (and the optional batch norm and dropout) only if ``last_activation``. Empty
    ``sizes`` give an identity. Kept instead of ``torchrec.modules.mlp.MLP``, which has no batch norm or dropout
    (the deep towers of DeepFM, Wide&Deep and DCN use both: BARS' tuned settings).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"MLP dropout must be in [0, 1) (got {dropout}).")
    if any(size <= 0 for size in sizes):
        raise ValueError(f"MLP sizes must be positive (got {list(sizes)}).")
    layers: list[nn.Module] = []
    for i, size in enumerate(sizes):
        layers.append(nn.Linear(in_features, size))
        if last_activation or i < len(sizes) - 1:
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        in_features = size
    return nn.Sequential(*layers)


def mlp_out_features(in_features: int, sizes: Sequence[int]) -> int:
    """Width of :func:`mlp`'s output: the last size, or ``in_features`` for an empty (identity) stack."""
    return int(sizes[-1]) if len(sizes) else in_features


@dataclass(frozen=True)
class EmbeddingFields:
    """The pooled fields an embedding module outputs: feature keys in output order and each one's dim.

    Read from ``embedding.embedding_bag_configs()`` (a ``recsys_embed`` method or a TorchRec EBC), so models never
    build tables of their own.

    Example::

        fields = EmbeddingFields.of(build_embedding("full", tables))
        fields.keys, fields.dims, fields.total_dim
    """

    keys: tuple[str, ...]
    dims: tuple[int, ...]

    @classmethod
    def of(cls, embedding: nn.Module) -> EmbeddingFields:
        configs = embedding.embedding_bag_configs()
        keys = tuple(f for c in configs for f in c.feature_names)
        dims = tuple(c.embedding_dim for c in configs for _ in c.feature_names)
        if not keys:
            raise ValueError("The embedding module has no features: its embedding_bag_configs() list none.")
        return cls(keys, dims)

    @property
    def num_fields(self) -> int:
        return len(self.keys)

    @property
    def total_dim(self) -> int:
        """Width of the flattened embeddings, ``sum_f d_f``."""
        return sum(self.dims)

    def common_dim(self, model: str) -> int:
        """The one embedding dim of all fields; a ``ValueError`` naming the dims and the fix if they differ."""
        distinct = sorted(set(self.dims))
        if len(distinct) != 1:
            per_dim = {d: [k for k, kd in zip(self.keys, self.dims) if kd == d] for d in distinct}
            raise ValueError(
                f"{model} needs one embedding_dim for all tables, got dims {distinct} (features by dim: {per_dim}). "
                "Give every EmbeddingBagConfig the same embedding_dim, or use a model that concatenates "
                "mixed-dim embeddings (WideDeep, DCN, DCNv2)."
            )
        return distinct[0]


def flat_embeddings(pooled: KeyedTensor, keys: Sequence[str]) -> torch.Tensor:
    """The pooled embeddings of ``keys`` concatenated in that order: ``(B, sum_f d_f)`` (dims may differ)."""
    if list(pooled.keys()) != list(keys):
        return torch.cat([pooled[k] for k in keys], dim=1)
    return pooled.values()


def stacked_embeddings(pooled: KeyedTensor, keys: Sequence[str], dim: int) -> torch.Tensor:
    """The pooled embeddings of ``keys`` as a ``(B, F, dim)`` tensor (all fields must have ``dim``)."""
    values = flat_embeddings(pooled, keys)
    return values.reshape(values.shape[0], len(keys), dim)


def with_dense(flat: torch.Tensor, dense: torch.Tensor, num_dense: int) -> torch.Tensor:
    """``[flat, dense]`` along dim 1 (``(B, sum d_f + num_dense)``); just ``flat`` when there are no dense features."""
    if num_dense == 0:
        return flat
    if dense.dim() != 2 or dense.shape[1] != num_dense:
        raise ValueError(f"Expected dense features of shape (B, {num_dense}), got {tuple(dense.shape)}.")
    return torch.cat([flat, dense.to(flat.dtype)], dim=1)


class FieldLinear(nn.Module):
    """First-order term from the embeddings: ``sum_f <w_f, e_f> + <w_dense, x_dense> + b`` -> ``(B,)``.

    The classic linear part of FM / Wide&Deep keeps one scalar weight per *id*, a hidden one-dim table as large as
    the embedding tables' rows, which would escape the memory budget. Here the weight of id ``i`` of field ``f`` is
    tied to its (possibly compressed) embedding, ``w_i = <w_f, e_i>``, with one learned vector ``w_f`` per field:
    ``sum_f d_f`` parameters, nothing per id. Implemented as one ``Linear(sum_f d_f + num_dense, 1)`` over
    ``[e_1, ..., e_F, x_dense]`` (see :func:`with_dense`).
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, flat_with_dense: torch.Tensor) -> torch.Tensor:
        return self.linear(flat_with_dense).squeeze(1)


class DenseProjection(nn.Module):
    """Dense features as one more ``dim``-vector field: ``v = sum_j x_j v_j`` (a bias-free linear map).

    Without a bias, ``<v, e_f> = sum_j x_j <v_j, e_f>``: exactly the factorization machine's pairwise terms between
    each real-valued feature ``j`` (with its latent vector ``v_j``) and field ``f``; ``(B, num_dense) -> (B, dim)``.
    The ``v_j`` start as ``N(0, init_std^2)``, the usual small FM latent init: with ``Linear``'s default init the
    un-normalised dense values gave a large vector that slowed DeepFM's early training on the synthetic data.
    """

    def __init__(self, num_dense: int, dim: int, *, init_std: float = 0.01) -> None:
        super().__init__()
        self.linear = nn.Linear(num_dense, dim, bias=False)
        nn.init.normal_(self.linear.weight, std=init_std)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.linear(dense)


def fm_interaction(vectors: torch.Tensor) -> torch.Tensor:
    """Factorization-machine pairwise term ``sum_{i<j} <v_i, v_j>`` of ``(B, F, D)`` vectors -> ``(B,)``.

    Rendle's O(F D) identity: ``0.5 * sum_d ((sum_i v_id)^2 - sum_i v_id^2)``. Kept instead of
    ``torchrec.modules.deepfm.FactorizationMachine``, which flattens the fields first and so sums the products of
    all ``F D`` scalars, ``sum_{(i,d) < (j,e)} v_id v_je`` (cross-dimension and same-field terms too), not the FM's
    field-pair dot products.
    """
    square_of_sum = vectors.sum(dim=1).pow(2)
    sum_of_squares = vectors.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)

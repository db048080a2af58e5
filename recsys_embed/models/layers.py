"""Building blocks shared by the CTR models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedTensor


def mlp(in_features: int, sizes: Sequence[int], *, last_activation: bool = True) -> nn.Sequential:
    """``Linear -> ReLU`` stack through ``sizes``; the last ReLU only if ``last_activation``."""
    layers: list[nn.Module] = []
    for i, size in enumerate(sizes):
        layers.append(nn.Linear(in_features, size))
        if last_activation or i < len(sizes) - 1:
            layers.append(nn.ReLU())
        in_features = size
    return nn.Sequential(*layers)


def stacked_embeddings(pooled: KeyedTensor, keys: Sequence[str], dim: int) -> torch.Tensor:
    """The pooled embeddings of ``keys`` as a ``(B, F, dim)`` tensor (keys must already be in output order)."""
    if list(pooled.keys()) != list(keys):
        values = torch.cat([pooled[k] for k in keys], dim=1)
    else:
        values = pooled.values()
    return values.reshape(values.shape[0], len(keys), dim)


class DotInteraction(nn.Module):
    """Pairwise dot products of ``F`` vectors (strict upper triangle): ``(B, F, D) -> (B, F (F - 1) / 2)``."""

    def __init__(self, num_vectors: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def out_features(self) -> int:
        return int(self.rows.numel())

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        return gram[:, self.rows, self.cols]

"""Cross networks of DCN (Wang et al., ADKDD'17) and DCN-v2 (Wang et al., WWW'21).

Both map ``x0`` of shape ``(B, d)`` to ``x_L`` of the same shape through ``L`` residual cross layers; layer ``l``
multiplies ``x0`` element-wise by a function of ``x_l``, so ``x_L`` holds explicit feature crosses up to degree
``L + 1``:

- DCN:    ``x_{l+1} = x0 * (x_l . w_l) + b_l + x_l``  (``w_l, b_l`` in ``R^d``: a rank-one cross);
- DCN-v2: ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``     (``W_l`` in ``R^{d x d}``, or ``U_l V_l^T`` of rank ``r``).
"""

from __future__ import annotations

import torch
from torch import nn


def _check_layers(num_layers: int) -> None:
    if num_layers < 1:
        raise ValueError(f"A cross network needs num_cross_layers >= 1 (got {num_layers}).")


class CrossNet(nn.Module):
    """DCN's cross network: ``x_{l+1} = x0 * (x_l . w_l) + b_l + x_l``, ``(B, d) -> (B, d)``.

    Each layer has ``2 d`` parameters (``w_l`` initialised like a ``Linear(d, 1)``, ``b_l = 0``).
    """

    def __init__(self, in_features: int, num_layers: int = 3) -> None:
        super().__init__()
        _check_layers(num_layers)
        bound = in_features**-0.5
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(in_features).uniform_(-bound, bound)) for _ in range(num_layers)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(in_features)) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weights, self.biases):
            x = x0 * (x @ w).unsqueeze(1) + b + x
        return x


class CrossNetV2(nn.Module):
    """DCN-v2's cross network: ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``, ``(B, d) -> (B, d)``.

    Args:
        in_features: ``d``, the width of ``x0``.
        num_layers: number of cross layers ``L``.
        low_rank: ``None`` for full-rank ``W_l`` (``d^2 + d`` parameters a layer); ``r`` for ``W_l = U_l V_l^T``
            with ``U_l, V_l`` in ``R^{d x r}`` (``2 d r + d`` a layer; the paper's cost-efficient variant, worth it
            when ``r < d / 2``).
    """

    def __init__(self, in_features: int, num_layers: int = 3, *, low_rank: int | None = None) -> None:
        super().__init__()
        _check_layers(num_layers)
        if low_rank is not None and low_rank < 1:
            raise ValueError(f"DCN-v2 low_rank must be a positive rank or None for full rank (got {low_rank}).")
        self.low_rank = low_rank
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            if low_rank is None:
                layers.append(nn.Linear(in_features, in_features))
            else:  # x -> U (V^T x) + b
                layers.append(
                    nn.Sequential(nn.Linear(in_features, low_rank, bias=False), nn.Linear(low_rank, in_features))
                )
        self.layers = nn.ModuleList(layers)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x

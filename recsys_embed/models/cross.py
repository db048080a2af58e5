"""Cross networks of DCN (Wang et al., ADKDD'17) and DCN-v2 (Wang et al., WWW'21): TorchRec's modules.

Both map ``x0`` of shape ``(B, d)`` to ``x_L`` of the same shape through ``L`` residual cross layers; layer ``l``
multiplies ``x0`` element-wise by a function of ``x_l``, so ``x_L`` holds explicit feature crosses up to degree
``L + 1``:

- DCN:    ``x_{l+1} = x0 * (x_l . w_l) + b_l + x_l``  (``w_l, b_l`` in ``R^d``, ``2 d`` parameters a layer):
  ``torchrec.modules.crossnet.VectorCrossNet``;
- DCN-v2: ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``     (``W_l`` in ``R^{d x d}``, ``d^2 + d`` a layer):
  ``torchrec.modules.crossnet.CrossNet``; with ``W_l = U_l V_l^T`` of rank ``r`` (``2 d r + d`` a layer, the
  paper's cost-efficient variant, worth it when ``r < d / 2``): ``torchrec.modules.crossnet.LowRankCrossNet``.

The functions here add a clear error for bad sizes and start the layers as this project's models always did (the
DCN-v2 matrices and biases like ``nn.Linear``, the DCN vectors ``U(-1/sqrt(d), 1/sqrt(d))`` and zero biases, drawn
in the same order), so seeded runs start from the same weights as before (their outputs differ in float rounding
only: TorchRec multiplies in another order). TorchRec's own init (Xavier-normal matrices, zero biases) is drawn from
a forked generator and overwritten.

Example::

    cross = dcnv2_cross(in_features=64, num_layers=3, low_rank=16)
    x_L = cross(x0)  # (B, 64) -> (B, 64)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, VectorCrossNet


def _check_layers(num_layers: int) -> None:
    if num_layers < 1:
        raise ValueError(f"A cross network needs num_cross_layers >= 1 (got {num_layers}).")


def _like_linear_(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """``nn.Linear``'s default init of a ``(out, in)`` weight and its bias (``bias`` may be ``(out,)`` or
    ``(out, 1)``): Kaiming-uniform with ``a = sqrt(5)``, then ``U(-1/sqrt(in), 1/sqrt(in))``."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(weight.shape[1])
    nn.init.uniform_(bias, -bound, bound)


def dcn_cross(in_features: int, num_layers: int = 3) -> VectorCrossNet:
    """DCN's cross network, TorchRec's ``VectorCrossNet``: ``x_{l+1} = x0 * (x_l . w_l) + b_l + x_l``.

    ``(B, d) -> (B, d)``, ``2 d`` parameters a layer (``w_l`` as a ``(d, 1)`` kernel, ``b_l`` as ``(d, 1)``).
    """
    _check_layers(num_layers)
    with torch.random.fork_rng(devices=[]):
        cross = VectorCrossNet(in_features, num_layers)
    bound = in_features**-0.5
    with torch.no_grad():
        for kernel in cross.kernels:
            kernel.uniform_(-bound, bound)
        for bias in cross.bias:
            bias.zero_()
    return cross


def dcnv2_cross(in_features: int, num_layers: int = 3, *, low_rank: int | None = None) -> CrossNet | LowRankCrossNet:
    """DCN-v2's cross network ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``, ``(B, d) -> (B, d)``.

    Args:
        in_features: ``d``, the width of ``x0``.
        num_layers: number of cross layers ``L``.
        low_rank: ``None`` for full-rank ``W_l`` (TorchRec's ``CrossNet``: ``kernels[l]`` is ``W_l``,
            ``bias[l]`` is ``(d, 1)``); a rank ``r`` for ``W_l = U_l V_l^T`` (TorchRec's ``LowRankCrossNet``:
            ``W_kernels[l]`` is ``U_l`` ``(d, r)``, ``V_kernels[l]`` is ``V_l^T`` ``(r, d)``).
    """
    _check_layers(num_layers)
    if low_rank is not None and low_rank < 1:
        raise ValueError(f"DCN-v2 low_rank must be a positive rank or None for full rank (got {low_rank}).")
    with torch.random.fork_rng(devices=[]):
        full = low_rank is None
        cross = CrossNet(in_features, num_layers) if full else LowRankCrossNet(in_features, num_layers, low_rank)
    with torch.no_grad():
        for layer in range(num_layers):
            if isinstance(cross, CrossNet):
                _like_linear_(cross.kernels[layer], cross.bias[layer])
            else:  # as Linear(d, r, bias=False) then Linear(r, d): V^T first, then U and its bias
                nn.init.kaiming_uniform_(cross.V_kernels[layer], a=math.sqrt(5))
                _like_linear_(cross.W_kernels[layer], cross.bias[layer])
    return cross

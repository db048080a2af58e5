"""Fused sparse training: turn a method's plain TorchRec tables into fbgemm table-batched kernels.

A fused table applies its optimizer inside backward (fbgemm TBE), so the rows never get a dense gradient. This is
the fast path for training on one process; with several processes the TorchRec sharding strategy does the same
through ``DistributedModelParallel``. Lightning's optimizer then drives only the dense parameters
(see :func:`dense_parameters`).

Example::

    emb = build_embedding("full", tables)
    model = DLRM(emb, num_dense=13)
    fuse_tables(model, SparseOptimizer(name="rowwise_adagrad", lr=0.05))
    dense_opt = torch.optim.Adam(dense_parameters(model), lr=1e-3)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad

from recsys_embed.methods.base import TBE_DIM_MULTIPLE

log = logging.getLogger(__name__)

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}


@dataclass
class SparseOptimizer:
    """The optimizer fused into the embedding tables (applied inside backward by fbgemm).

    ``rowwise_adagrad`` keeps one accumulator per row (the DLRM default); ``adagrad`` one per element; ``sgd``
    none; ``adam`` two per element (CUDA only: fbgemm's CPU kernels have no Adam).
    """

    name: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"Unknown sparse optimizer {self.name!r}; choose one of {sorted(_OPTIMIZERS)}.")
        if self.lr <= 0:
            raise ValueError(f"Sparse optimizer lr must be positive (got {self.lr}).")

    def torch_type_and_kwargs(self) -> tuple[type[torch.optim.Optimizer], dict[str, float]]:
        kwargs = {"lr": self.lr} if self.name == "sgd" else {"lr": self.lr, "eps": self.eps}
        return _OPTIMIZERS[self.name], kwargs


def fuse_tables(module: nn.Module, optimizer: SparseOptimizer, device: torch.device | None = None) -> int:
    """Replace every ``EmbeddingBagCollection`` below ``module`` by a fused fbgemm one, keeping the weights.

    Returns the number of collections fused. State-dict keys are unchanged, so checkpoints load either way.
    """
    opt_type, opt_kwargs = optimizer.torch_type_and_kwargs()
    fused = 0
    if optimizer.name == "adam" and (device is None or device.type == "cpu"):
        raise ValueError("Sparse optimizer 'adam' needs CUDA (fbgemm has no CPU Adam); use 'rowwise_adagrad' on CPU.")
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not EmbeddingBagCollection:
                continue
            target = device or next(child.parameters()).device
            for table in child.embedding_bag_configs():
                if table.embedding_dim % TBE_DIM_MULTIPLE:
                    raise ValueError(
                        f"Table {table.name!r} has embedding_dim {table.embedding_dim}: fbgemm's table-batched kernels "
                        f"need a multiple of {TBE_DIM_MULTIPLE}; change the dim (or the method's dim options)."
                    )
            replacement = FusedEmbeddingBagCollection(
                tables=child.embedding_bag_configs(),
                optimizer_type=opt_type,
                optimizer_kwargs=opt_kwargs,
                device=target,
            )
            replacement.load_state_dict(child.state_dict())
            setattr(parent, child_name, replacement)
            fused += 1
    if fused:
        log.info("Fused %d embedding collection(s) with sparse optimizer %s", fused, optimizer)
    return fused


def sparse_parameter_ids(module: nn.Module) -> set[int]:
    """ids of the parameters that a fused or plain embedding collection owns."""
    ids: set[int] = set()
    for child in module.modules():
        if isinstance(child, FusedEmbeddingBagCollection):
            ids.update(id(p) for p in child.parameters())
    return ids


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters the dense (Lightning/PyTorch) optimizer must update: everything but fused tables."""
    skip = sparse_parameter_ids(module)
    return [p for p in module.parameters() if id(p) not in skip and p.requires_grad]

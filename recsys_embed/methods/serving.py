"""Traced served forms: ``torchrec.fx.symbolic_trace`` and ``torch.export`` of :meth:`EmbeddingMethod.to_serving`.

Every registered method's served form traces both ways (checked by ``tests/test_export.py``); the traced modules
give the eager served form's outputs on new batches:

- fx (:func:`trace_serving`): a ``GraphModule`` for any batch size, ids and lengths; the input checks (key order,
  id ranges) are one leaf call that runs on every input; an empty batch (``stride() == 0``) is not supported;
- export (:func:`export_serving`): an ``ExportedProgram`` whose number of ids and batch size are dynamic (the KJT's
  values and lengths, see :func:`kjt_dynamic_shapes`). Its inputs must have the example's keys in the example's
  order (the keys are part of the exported input spec) and be built the same way (lengths, and offsets only if
  the example had them); ids are not range-checked. With a dynamic batch, torch.export specialises sizes 0 and 1
  away (as for TorchRec's own ``EmbeddingBagCollection``): the program serves batches of 2 or more; export with
  ``dynamic_batch=False`` on a batch-1 example to serve single examples. ``torch.export.save`` writes it as a
  serving artifact that ``torch.export.load`` reads with torch and torchrec alone (no recsys_embed import).

Example::

    served = export_serving(method, example_kjt)
    pooled = served.module()(kjt)  # a KeyedTensor, equal to method.to_serving()(kjt)
"""

from __future__ import annotations

from typing import Any

import torch
import torchrec.fx
from torch import nn
from torch.export import Dim
from torchrec import KeyedJaggedTensor

from recsys_embed.methods.base import EmbeddingMethod

#: the largest number of ids (and of bags) an exported program accepts
MAX_IDS = 2**40
# A saved program stores its example KJT: let torch.export.load read it with weights_only (the default).
torch.serialization.add_safe_globals([KeyedJaggedTensor])


def served(module: nn.Module) -> nn.Module:
    """``module.to_serving()`` for a method (its served form, in eval mode); any other module as it is."""
    return module.to_serving() if isinstance(module, EmbeddingMethod) else module


def trace_serving(module: nn.Module) -> torch.fx.GraphModule:
    """``torchrec.fx.symbolic_trace`` of the served form of ``module`` (a method, or an already served form)."""
    return torchrec.fx.symbolic_trace(served(module))


def kjt_dynamic_shapes(example: KeyedJaggedTensor, *, dynamic_batch: bool = True) -> list[dict[int, Any] | None]:
    """``dynamic_shapes`` for a KJT argument of ``torch.export.export``: the number of ids is dynamic, and the batch
    size too unless ``dynamic_batch=False``. One entry per tensor TorchRec flattens a KJT into (values, weights,
    lengths, offsets, stride per key per rank, inverse indices); None where the example has no such tensor."""
    leaves, _ = torch.utils._pytree.tree_flatten(example)
    if len(leaves) != 6:
        raise ValueError(f"Expected TorchRec's KJT to flatten into 6 tensors, got {len(leaves)}: unknown torchrec.")
    values, weights, lengths, offsets, stride_per_key_per_rank, inverse_indices = leaves
    if stride_per_key_per_rank is not None or inverse_indices is not None:
        raise ValueError("Variable batch sizes per feature (stride_per_key_per_rank) are not supported by export.")
    if lengths is None:
        raise ValueError("Export needs a KJT built with lengths= (offsets alone are not supported).")
    ids = Dim("ids", min=0, max=MAX_IDS)
    features = len(example.keys())
    bags: Any = features * Dim("batch", min=1, max=MAX_IDS // features) if dynamic_batch else None
    return [
        {0: ids},
        {0: ids} if weights is not None else None,
        {0: bags} if bags is not None else None,
        {0: bags + 1} if offsets is not None and bags is not None else None,
        None,
        None,
    ]


def export_serving(
    module: nn.Module, example: KeyedJaggedTensor, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict, as TorchRec exports its modules) of the served form of ``module`` on
    ``example``, with a dynamic number of ids and (unless ``dynamic_batch=False``) a dynamic batch size."""
    shapes = (kjt_dynamic_shapes(example, dynamic_batch=dynamic_batch),)
    return torch.export.export(served(module), (example,), dynamic_shapes=shapes, strict=False)

"""Declarative remap methods and the one executor that runs them (hash, multi-hash, QR, unified, adapt, QR-path).

A remap method states four things (:class:`RemapMethod`): its physical TorchRec tables (declared storage), a pure
id map (:meth:`RemapMethod.id_map`: the ``k`` physical rows of every id of the batch, vectorized), how an id's ``k``
rows combine (``sum`` in the bag, ``product``, ``concat``; ``k = 1`` needs none), and its memory formula. The
:class:`RemapExecutor` owns everything else: the physical KJT layout that keeps fbgemm on its fast paths
(``k`` ids per bag for ``sum``, ``k`` blocks of bags for ``product``, ``k`` features for ``concat``, all features
as blocks of bags of one feature for a shared table), the one TorchRec lookup, and the combine back to the logical
``KeyedTensor``. :meth:`RemapMethod.reference_rows` restates the id map per id in plain Python; a registry-wide
test checks the vectorized map against it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.fx
from torch.autograd.function import once_differentiable
from torchrec import KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import EmbeddingMethod
from recsys_embed.methods.layouts import (
    BagFold,
    BatchFanOut,
    FanOut,
    as_one_feature,
    blocks_side_by_side,
    keyed,
    physical_keys,
)

Combine = Literal["sum", "product", "concat"]


class _PartitionProduct(torch.autograd.Function):
    """``x[0] * x[1] * ... * x[k - 1]`` over the first dim of ``(k, B, D)`` (left to right, as ``math.prod``).

    The backward writes each partition's gradient (``grad`` times the other partitions) into one ``(k, B, D)``
    buffer; autograd's own graph (``unbind`` + products) builds ``k`` separate tensors and stacks them. No division,
    so zeros are safe (unlike ``torch.prod``'s backward).
    """

    @staticmethod
    def forward(ctx: Any, parts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(parts)
        factors = parts.unbind(0)
        return math.prod(factors[1:], start=factors[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (parts,) = ctx.saved_tensors
        out = torch.empty_like(parts)
        for c in range(parts.shape[0]):
            others = [parts[j] for j in range(parts.shape[0]) if j != c]
            torch.mul(grad, math.prod(others[1:], start=others[0]), out=out[c])
        return out


class RemapExecutor:
    """Runs a declared remap: per-id rows -> the physical KJT -> (after the lookup) the logical pooled values.

    Layouts, chosen from the declaration (measured on fbgemm's CPU kernels; see the classes above):

    - ``k = 1`` for every feature: the logical features themselves (:class:`FanOut` with one copy);
    - ``sum``: each id's ``k`` rows in its own bag (:class:`BagFold`), fbgemm's pooling sums them;
    - ``product``: ``k`` blocks of bags of each feature (:class:`BatchFanOut`), multiplied after pooling;
    - ``concat``: ``k`` physical features ``f@c`` (:class:`FanOut`), side by side after pooling;
    - ``shared`` (one table read by every feature): the physical features become blocks of bags of the one
      feature ``shared`` (:func:`as_one_feature`), so fbgemm takes its fast row-wise backward.
    """

    def __init__(
        self, features: list[str], dims: list[int], copies: list[int], combine: Combine, shared: str | None = None
    ) -> None:
        if combine not in ("sum", "product", "concat"):
            raise ValueError(f"Unknown combine {combine!r}; use 'sum', 'product' or 'concat'.")
        if combine == "product" and len(set(copies)) > 1:
            raise ValueError(f"combine='product' needs the same number of rows for every feature (got {copies}).")
        self.features, self.dims, self.copies, self.shared = list(features), list(dims), list(copies), shared
        self.most = max(copies)
        self.combine_kind: Combine | None = None if max(copies) == 1 else combine
        self.rewrite: FanOut | BagFold
        if self.combine_kind == "sum":
            self.rewrite = BagFold(self.features, self.copies)
        elif self.combine_kind == "product":
            self.rewrite = BatchFanOut(self.features, self.copies[0])
        else:
            self.rewrite = FanOut(self.features, self.copies)
        widths = [d // k for d, k in zip(self.dims, self.copies)]  # concat: a feature's dim split among its copies
        #: concat with fewer copies for some features: the pooled columns of live copies (None: all are live)
        self.columns = self.rewrite.live_columns(widths) if self.combine_kind == "concat" else None

    def physical_features(self, table_features: list[str]) -> list[str]:
        """The physical feature names a physical table must list for the logical features it serves."""
        if self.shared is not None:
            return [self.shared]
        if self.combine_kind == "concat":
            most = max(self.copies)
            return physical_keys(table_features, [most] * len(table_features))
        return list(table_features)

    def __call__(self, features: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
        """The physical KJT for ``rows`` (``(k, F, L)`` or ``(k, N)``: copy ``c`` of every id)."""
        rows = rows[: self.most]  # an id map may compute more copies than any feature keeps (a view otherwise)
        physical = self.rewrite(features, rows)
        return as_one_feature(physical, self.shared) if self.shared is not None else physical

    def combine(self, pooled: torch.Tensor, batch: int, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The physical lookup's pooled values -> ``(B, sum d)`` logical values, features in order (``columns``:
        :attr:`columns` on the values' device)."""
        if self.shared is not None:  # block f of bags holds physical feature f
            pooled = blocks_side_by_side(pooled, batch)
        if self.combine_kind == "product":  # (k * B, sum d): copy c of example b in row c * B + b
            return _PartitionProduct.apply(pooled.view(self.copies[0], batch, -1))
        if columns is not None:
            return pooled.index_select(1, columns)
        return pooled  # sum: pooled by fbgemm; concat: already side by side; k = 1: the rows themselves


class RemapMethod(EmbeddingMethod):
    """Base of the remap methods: declare tables, copies and combine, implement :meth:`id_map`; nothing else.

    Subclasses call :meth:`declare_remap` in ``__init__`` (before :meth:`add_tables`, whose physical tables list
    :meth:`physical_features`), implement :meth:`id_map` (vectorized) and :meth:`reference_rows` (per id, plain
    Python: the definition the tests hold the vectorized map to), and give their memory formula.
    """

    executor: RemapExecutor

    def declare_remap(self, copies: list[int], combine: Combine = "sum", shared: str | None = None) -> None:
        """``copies[f]`` physical rows per id of logical feature ``f``, combined by ``combine``; ``shared`` names the
        one physical feature of a table read by every logical feature."""
        self.executor = RemapExecutor(self._feature_names, self._length_per_key, copies, combine, shared)
        self.register_buffer("live_columns", self.executor.columns, persistent=False)

    def physical_features(self, table_features: list[str]) -> list[str]:
        return self.executor.physical_features(table_features)

    def id_map(self, features: KeyedJaggedTensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``(k, F, L)`` (one row per copy, for the ``F x L`` ids of a uniform batch, see :class:`IdLayout`) or
        ``(k, N)``: the physical row of copy ``c`` of every id; copies past a feature's own ``k`` are ignored."""
        raise NotImplementedError

    def reference_rows(self, feature: str, id: int) -> list[int]:  # pragma: no cover - abstract
        """The physical rows of one id of ``feature`` (one per copy), computed without tensors."""
        raise NotImplementedError

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The physical KJT of a checked batch."""
        return self.executor(features, self.id_map(features))

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.tables(self.remap(features)).values()  # type: ignore[operator]
        values = self.executor.combine(pooled, features.stride(), self.live_columns)
        return keyed(values, self._feature_names, self._length_per_key)

    def physical_rows(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Per logical feature: ``(k_f, N_f)`` physical rows of its ids (for tests and analysis; ids unchecked)."""
        if features.keys() != self._feature_names:
            features = features.permute([features.keys().index(f) for f in self._feature_names])
        rows = self.id_map(features)
        rows = rows.flatten(1) if rows.dim() == 3 else rows
        out, start = {}, 0
        for f, k, size in zip(self._feature_names, self.executor.copies, features.length_per_key()):
            out[f] = rows[:k, start : start + size]
            start += size
        return out

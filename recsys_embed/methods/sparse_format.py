"""Element-sparse tables (``pep``, ``deeplight``): the bytes of a table's kept entries in CSR or COO, whichever is
smaller (as the VLDB'24 embedding-compression benchmark counts them, Zhang et al., arXiv 2311.15578), and packed
served forms holding exactly those bytes.

A table of ``n`` rows, dim ``d`` and ``nnz`` kept entries stores its values as fp32 and each index at the smallest
signed int dtype that holds it (int8/int16/int32/int64)::

    csr = nnz * (4 + c) + n * p        # value + column per entry, one row end per row (p holds nnz)
    coo = nnz * (4 + r + c)            # value + row + column per entry
    bytes = min(csr, coo)              # c, r: bytes of the column (< d) and row (< n) index dtypes

Example::

    table = PackedSparseTable(num_rows=1000, dim=16, nnz=int(mask.sum()))
    table.pack(dense, mask)                           # the entries where mask is true
    rows = table.rows(ids)                            # (len(ids), 16), zeros where nothing is kept
    served = PackedSparseTables(tables, masked_weights)  # KJT -> KeyedTensor, pooled sums of such rows
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods import checks
from recsys_embed.methods.checks import IdBounds
from recsys_embed.methods.layouts import keyed
from recsys_embed.methods.tables import FP32_BYTES

INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def index_dtype(largest: int) -> torch.dtype:
    """The smallest signed int dtype holding ``0..largest``."""
    return next(t for t in INDEX_DTYPES if max(largest, 0) <= torch.iinfo(t).max)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def csr_bytes(num_rows: int, dim: int, nnz: int) -> int:
    return nnz * (FP32_BYTES + _size(index_dtype(dim - 1))) + num_rows * _size(index_dtype(nnz))


def coo_bytes(num_rows: int, dim: int, nnz: int) -> int:
    return nnz * (FP32_BYTES + _size(index_dtype(num_rows - 1)) + _size(index_dtype(dim - 1)))


def packed_format(num_rows: int, dim: int, nnz: int) -> str:
    """``"csr"`` or ``"coo"``: the smaller (CSR on a tie)."""
    return "csr" if csr_bytes(num_rows, dim, nnz) <= coo_bytes(num_rows, dim, nnz) else "coo"


def packed_bytes(num_rows: int, dim: int, nnz: int) -> int:
    """Bytes of ``nnz`` kept entries of a ``num_rows x dim`` table in its smaller format (the module's formula)."""
    return min(csr_bytes(num_rows, dim, nnz), coo_bytes(num_rows, dim, nnz))


def largest_that_fit(margins: list[torch.Tensor], target_bytes: int, positive_only: bool) -> list[torch.Tensor]:
    """Per table, the entries of largest margin (over every table: one cut) whose packed bytes fit ``target_bytes``;
    entries tied with the first one left out are left out too. ``positive_only``: margins above 0 only."""
    flat = torch.cat([m.reshape(-1) for m in margins]).float()
    ordered = flat.sort(descending=True).values
    ascending = [m.reshape(-1).float().sort().values for m in margins]

    def fits(k: int) -> bool:  # keep every entry above the (k+1)-th largest margin
        cut = float(ordered[k]) if k < ordered.numel() else -math.inf
        counts = [a.numel() - int(torch.searchsorted(a, torch.tensor(cut), right=True)) for a in ascending]
        return sum(packed_bytes(m.shape[0], m.shape[1], c) for m, c in zip(margins, counts)) <= target_bytes

    lo, hi = 0, ordered.numel()  # fits(0) keeps nothing above the largest margin: always fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    kept = (
        [m > ordered[lo] for m in margins]
        if lo < ordered.numel()
        else [torch.ones_like(m, dtype=torch.bool) for m in margins]
    )
    return [k & (m > 0) for k, m in zip(kept, margins)] if positive_only else kept


class PackedSparseTable(nn.Module):
    """One table's kept entries as buffers, row-major: ``values`` (fp32), ``columns`` and either ``row_ends`` (CSR:
    the end of each row's entries) or ``row_ids`` (COO: each entry's row, sorted). Stores :func:`packed_bytes`."""

    def __init__(self, num_rows: int, dim: int, nnz: int, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.num_rows, self.dim, self.nnz = num_rows, dim, nnz
        self.format = packed_format(num_rows, dim, nnz)
        dev = torch.device(device or "cpu")
        self.register_buffer("values", torch.zeros(nnz, device=dev))
        self.register_buffer("columns", torch.zeros(nnz, dtype=index_dtype(dim - 1), device=dev))
        if self.format == "csr":
            self.register_buffer("row_ends", torch.zeros(num_rows, dtype=index_dtype(nnz), device=dev))
        else:
            self.register_buffer("row_ids", torch.zeros(nnz, dtype=index_dtype(num_rows - 1), device=dev))

    def pack(self, dense: torch.Tensor, mask: torch.Tensor) -> None:
        """Fill the buffers with the entries of a dense ``(num_rows, dim)`` table where ``mask`` is true."""
        if dense.shape != (self.num_rows, self.dim) or mask.shape != dense.shape or int(mask.sum()) != self.nnz:
            raise ValueError(
                f"PackedSparseTable: got a {tuple(dense.shape)} table with {int(mask.sum())} kept entries; "
                f"this one packs {self.nnz} kept entries of a ({self.num_rows}, {self.dim}) table."
            )
        with torch.no_grad():
            rows, cols = mask.nonzero(as_tuple=True)  # row-major order
            self.values.copy_(dense[rows, cols].float())
            self.columns.copy_(cols.to(self.columns.dtype))
            if self.format == "csr":
                counts = torch.bincount(rows, minlength=self.num_rows)
                self.row_ends.copy_(counts.cumsum(0).to(self.row_ends.dtype))
            else:
                self.row_ids.copy_(rows.to(self.row_ids.dtype))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``(len(ids), dim)``: each id's row, its kept entries scattered into zeros. Static shapes (a row holds at
        most ``dim`` entries: each id reads ``dim`` slots, those past its count add zero), so it traces and exports."""
        if self.nnz == 0:
            return self.values.new_zeros((ids.shape[0], self.dim))
        if self.format == "csr":
            ends = self.row_ends.to(torch.int64)
            stop = ends[ids]
            start = torch.where(ids > 0, ends[(ids - 1).clamp(min=0)], torch.zeros_like(stop))
        else:
            row_ids = self.row_ids.to(torch.int64)
            start = torch.searchsorted(row_ids, ids)
            stop = torch.searchsorted(row_ids, ids, right=True)
        slot = torch.arange(self.dim, device=ids.device)
        position = (start.unsqueeze(1) + slot).clamp(max=self.nnz - 1)  # (len(ids), dim)
        valid = slot < (stop - start).unsqueeze(1)
        values = torch.where(valid, self.values[position], torch.zeros((), dtype=self.values.dtype))
        columns = torch.where(valid, self.columns[position].to(torch.int64), torch.zeros((), dtype=torch.int64))
        return self.values.new_zeros((ids.shape[0], self.dim)).scatter_add_(1, columns, values)


class PackedSparseTables(nn.Module):
    """Served element-sparse tables behind the EBC interface: a :class:`PackedSparseTable` per logical table (its
    nonzero entries of the given masked weights), each bag the sum of its ids' rows."""

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        weights: Sequence[torch.Tensor],
        method: str,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """``masks``: the entries to keep per table (default: the nonzero entries of ``weights``)."""
        super().__init__()
        self._features = [f for t in tables for f in t.feature_names]
        self._bounds = IdBounds(  # the input checks of every served form: keys, and ids inside each table
            method=method,
            cardinality={f: t.num_embeddings for t in tables for f in t.feature_names},
            unbounded=[],
            tables={f: t.name for t in tables for f in t.feature_names},
        )
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._table_index = [i for i, t in enumerate(tables) for _ in t.feature_names]
        self.tables = nn.ModuleList()
        for i, (t, w) in enumerate(zip(tables, weights)):
            mask = w.detach() != 0 if masks is None else masks[i]
            table = PackedSparseTable(t.num_embeddings, t.embedding_dim, int(mask.sum()), device=w.device)
            table.pack(w.detach(), mask)
            self.tables.append(table)

    @property
    def formats(self) -> list[str]:
        return [table.format for table in self.tables]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if torch.compiler.is_compiling() or (not is_fx_symbolic_tracing() and features.stride() == 0):
            features = checks.in_feature_order(features, self._features)  # export (ids unchecked) or an empty batch
        else:  # eager, or one fx leaf call: keys in order, ids checked
            features = checks.checked_features(features, self._features, self._bounds)
        ids = features.values().split(features.length_per_key())
        lengths = features.lengths().view(len(self._features), -1)
        out = []
        for j in range(len(self._dims)):  # each feature's bags pool its ids' rows (embedding_bag over those rows)
            bag_ids = ids[j].long()
            rows = self.tables[self._table_index[j]].rows(bag_ids)
            offsets = F.pad(lengths[j].cumsum(0), (1, 0))
            occurrence = torch.arange(bag_ids.shape[0], device=bag_ids.device)
            out.append(F.embedding_bag(occurrence, rows, offsets, mode="sum", include_last_offset=True))
        return keyed(torch.cat(out, 1), self._features, self._dims)

"""Element-sparse tables (PEP, ``pep.py``): the bytes of a table's kept entries in CSR or COO, whichever is smaller
(as the VLDB'24 embedding-compression benchmark counts them), and the packed served form holding exactly those bytes.

A table of ``n`` rows, dim ``d`` and ``nnz`` kept entries stores its values as fp32 and its indices at the smallest
signed int dtype that holds them (int8/int16/int32/int64)::

    csr = nnz * (4 + c) + n * p        # value + column per entry, one row end per row (p: int32, or int64 past 2^31)
    coo = nnz * (4 + r + c)            # value + row + column per entry
    bytes = min(csr, coo)              # c, r: bytes of the column (< d) and row (< n) index dtypes

Example::

    table = PackedSparseTable(num_rows=1000, dim=16, nnz=int(mask.sum()))
    table.pack(dense, mask)             # the entries where mask is true
    rows = table.rows(ids)              # (len(ids), 16), zeros where nothing is kept
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_embed.methods.tables import FP32_BYTES

INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def index_dtype(max_value: int) -> torch.dtype:
    """The smallest signed int dtype holding ``0..max_value``."""
    return next(t for t in INDEX_DTYPES if max_value <= torch.iinfo(t).max)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def csr_bytes(num_rows: int, dim: int, nnz: int) -> int:
    return nnz * (FP32_BYTES + _size(index_dtype(dim - 1))) + num_rows * _size(index_dtype(max(nnz, 2**31 - 1)))


def coo_bytes(num_rows: int, dim: int, nnz: int) -> int:
    return nnz * (FP32_BYTES + _size(index_dtype(num_rows - 1)) + _size(index_dtype(dim - 1)))


def packed_format(num_rows: int, dim: int, nnz: int) -> str:
    """``"csr"`` or ``"coo"``: the smaller (CSR on a tie)."""
    return "csr" if csr_bytes(num_rows, dim, nnz) <= coo_bytes(num_rows, dim, nnz) else "coo"


def packed_bytes(num_rows: int, dim: int, nnz: int) -> int:
    """Bytes of ``nnz`` kept entries of a ``num_rows x dim`` table in its smaller format (the module's formula)."""
    return min(csr_bytes(num_rows, dim, nnz), coo_bytes(num_rows, dim, nnz))


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
            ends = torch.zeros(num_rows, dtype=index_dtype(max(nnz, 2**31 - 1)), device=dev)
            self.register_buffer("row_ends", ends)
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
        """``(len(ids), dim)``: each id's row, its kept entries scattered into zeros (vectorized, no loop over ids)."""
        out = self.values.new_zeros((ids.numel(), self.dim))
        if self.nnz == 0 or ids.numel() == 0:
            return out
        if self.format == "csr":
            ends = self.row_ends.to(torch.int64)
            stop = ends[ids]
            start = torch.where(ids > 0, ends[(ids - 1).clamp(min=0)], torch.zeros_like(stop))
        else:
            row_ids = self.row_ids.to(torch.int64)
            start = torch.searchsorted(row_ids, ids)
            stop = torch.searchsorted(row_ids, ids, right=True)
        counts = stop - start
        owner = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts)
        first = torch.repeat_interleave(start - (counts.cumsum(0) - counts), counts)
        entry = first + torch.arange(owner.numel(), device=ids.device)
        out[owner, self.columns[entry].to(torch.int64)] = self.values[entry]
        return out

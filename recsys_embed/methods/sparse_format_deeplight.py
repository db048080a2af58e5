"""Sparse tables: the bytes of a pruned table in CSR or COO (whichever is smaller) and a packed served form.

A table of ``n`` rows and dim ``d`` with ``nnz`` kept entries stores, with fp32 values (the VLDB'24 embedding
compression benchmark's accounting, Zhang et al., "Experimental Analysis of Large-scale Learnable Vector Storage
Compression", VLDB'24)::

    csr = nnz * (4 + col_bytes) + (n + 1) * ptr_bytes
    coo = nnz * (4 + row_bytes + col_bytes)

``col_bytes``/``row_bytes``: the smallest int dtype (int8, int16, int32, int64) that holds ``d - 1``/``n - 1``;
``ptr_bytes``: the smallest that holds ``nnz``. :class:`PackedSparseTables` holds exactly those buffers.

Example::

    nbytes = sparse_table_bytes(rows=1000, dim=16, nnz=2000)  # min(CSR, COO)
    served = PackedSparseTables(tables, [masked_weight_0, masked_weight_1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.layouts import keyed

FP32_BYTES = 4
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def index_dtype(largest: int) -> torch.dtype:
    """The smallest signed int dtype that holds ``largest``."""
    return next(t for t in INT_DTYPES if largest <= torch.iinfo(t).max)


def _sizes(rows: int, dim: int, nnz: int) -> tuple[int, int, int]:
    size = lambda t: torch.tensor([], dtype=t).element_size()  # noqa: E731
    col = size(index_dtype(max(dim - 1, 0)))
    row = size(index_dtype(max(rows - 1, 0)))
    ptr = size(index_dtype(nnz))
    return col, row, ptr


def sparse_format(rows: int, dim: int, nnz: int) -> str:
    """``"csr"`` or ``"coo"``: the smaller form of a table with ``nnz`` kept entries (CSR on a tie)."""
    col, row, ptr = _sizes(rows, dim, nnz)
    return "csr" if nnz * col + (rows + 1) * ptr <= nnz * (row + col) else "coo"


def sparse_table_bytes(rows: int, dim: int, nnz: int) -> int:
    """Bytes of the smaller of CSR and COO (see the module docstring)."""
    col, row, ptr = _sizes(rows, dim, nnz)
    return nnz * (FP32_BYTES + col) + min((rows + 1) * ptr, nnz * row)


class PackedSparseTables(nn.Module):
    """Served sparse tables: per table ``values_i`` (fp32), ``cols_i`` and either ``crow_i`` (CSR row pointers) or
    ``rows_i`` (COO row ids, sorted); the pooled lookup sums each bag's rows (missing entries are zeros)."""

    def __init__(self, tables: Sequence[EmbeddingBagConfig], weights: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self._tables = list(tables)
        self._features = [f for t in self._tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in self._tables for _ in t.feature_names]
        self._table_index = [i for i, t in enumerate(self._tables) for _ in t.feature_names]
        self.formats: list[str] = []
        for i, (t, w) in enumerate(zip(self._tables, weights)):
            row, col = w.detach().nonzero(as_tuple=True)  # row-major order: sorted by row
            nnz = int(row.numel())
            fmt = sparse_format(t.num_embeddings, t.embedding_dim, nnz)
            self.formats.append(fmt)
            self.register_buffer(f"values_{i}", w.detach()[row, col].float().contiguous())
            self.register_buffer(f"cols_{i}", col.to(index_dtype(max(t.embedding_dim - 1, 0))))
            if fmt == "csr":
                counts = torch.bincount(row, minlength=t.num_embeddings)
                crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(index_dtype(nnz))
                self.register_buffer(f"crow_{i}", crow)
            else:
                self.register_buffer(f"rows_{i}", row.to(index_dtype(max(t.num_embeddings - 1, 0))))

    def _row_spans(self, i: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per id, the first position of its row's entries and their count."""
        if self.formats[i] == "csr":
            crow = getattr(self, f"crow_{i}").long()
            return crow[ids], crow[ids + 1] - crow[ids]
        rows = getattr(self, f"rows_{i}").long()
        start = torch.searchsorted(rows, ids)
        return start, torch.searchsorted(rows, ids, right=True) - start

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        features = features.permute([features.keys().index(f) for f in self._features])
        batch = features.stride()
        ids = features.values().split(features.length_per_key())
        lengths = features.lengths().view(len(self._features), -1)
        out = []
        for j, d in enumerate(self._dims):
            i, bag_ids = self._table_index[j], ids[j].long()
            owner = torch.arange(batch, device=bag_ids.device).repeat_interleave(lengths[j], output_size=len(bag_ids))
            start, count = self._row_spans(i, bag_ids)
            total = int(count.sum())
            first = torch.cumsum(count, 0) - count  # each id's first slot among the gathered entries
            entry_owner = torch.arange(len(bag_ids), device=bag_ids.device).repeat_interleave(count, output_size=total)
            pos = start[entry_owner] + torch.arange(total, device=bag_ids.device) - first[entry_owner]
            pooled = torch.zeros(batch, d, device=bag_ids.device)
            cols = getattr(self, f"cols_{i}")[pos].long()
            pooled.index_put_((owner[entry_owner], cols), getattr(self, f"values_{i}")[pos], accumulate=True)
            out.append(pooled)
        return keyed(torch.cat(out, 1), self._features, self._dims)

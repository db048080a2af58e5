"""Vectorized KJT rewriting shared by the id-remap methods (hash, multi-hash, QR, unified, adapt, MDE).

A remap method turns each logical feature into ``k`` physical features (``"{feature}@{c}"``) whose ids are rows of
plain TorchRec tables, runs one ``EmbeddingBagCollection`` lookup (fbgemm TBE once fused or sharded) and combines
the ``k`` pooled vectors of each feature (sum, concatenation, product). All helpers work on whole batches.
"""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor, KeyedTensor


def physical_keys(features: list[str], copies: list[int]) -> list[str]:
    """``[f@0, ..., f@{k_f - 1}]`` for every feature, in feature order; a feature with one copy keeps its name."""
    return [f if k == 1 else f"{f}@{c}" for f, k in zip(features, copies) for c in range(k)]


def value_features(features: KeyedJaggedTensor) -> torch.Tensor:
    """The feature index of every id of the KJT (ids are feature-major); ``per_feature[index]`` broadcasts."""
    values = features.values()
    lengths = torch.tensor(features.length_per_key(), device=values.device)
    return torch.arange(len(lengths), device=values.device).repeat_interleave(lengths, output_size=values.numel())


class FanOut:
    """Rewrites a KJT so that feature ``f`` becomes ``k_f`` physical features ``f@0 .. f@{k_f - 1}``.

    ``rows[c, i]`` is the physical row of copy ``c`` of id ``i`` (``rows`` has ``max k_f`` copies; copies at or
    beyond a feature's ``k_f`` are dropped). Every copy keeps its feature's bag lengths, so pooling copy ``c``
    gives exactly the pooled rows of hash/partition/chunk ``c``.
    """

    def __init__(self, features: list[str], copies: list[int]) -> None:
        self.features, self.copies, self.most = list(features), list(copies), max(copies)
        self.keys = physical_keys(self.features, self.copies)
        keep = [c < k for k in self.copies for c in range(self.most)]  # per (feature, copy) segment
        self.keep = None if all(keep) else torch.tensor(keep)

    def __call__(self, features: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
        copies, count = rows.shape
        if copies == 1:
            return KeyedJaggedTensor(
                keys=self.keys, values=rows[0], lengths=features.lengths(), stride=features.stride()
            )
        device = rows.device
        per_key = torch.tensor(features.length_per_key(), device=device)
        starts = torch.cumsum(per_key, 0) - per_key
        start_of = starts.repeat_interleave(per_key, output_size=count)
        length_of = per_key.repeat_interleave(per_key, output_size=count)
        within = torch.arange(count, device=device) - start_of
        copy = torch.arange(copies, device=device).unsqueeze(1)
        index = copies * start_of + copy * length_of + within
        values = torch.empty(copies * count, dtype=rows.dtype, device=device)
        values[index.reshape(-1)] = rows.reshape(-1)
        lengths = features.lengths().view(len(self.features), -1).repeat_interleave(copies, dim=0)
        if self.keep is not None:
            keep = self.keep.to(device)
            segment_sizes = per_key.repeat_interleave(copies)
            values = values[keep.repeat_interleave(segment_sizes, output_size=values.numel())]
            lengths = lengths[keep]
        return KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths.reshape(-1), stride=features.stride())


def sum_copies(pooled: torch.Tensor, dims: list[int], copies: list[int]) -> torch.Tensor:
    """``(B, sum_f k_f d_f)`` laid out ``[f0@0, f0@1, ..., f1@0, ...]`` -> ``(B, sum_f d_f)``, summing copies."""
    batch = pooled.shape[0]
    if len(set(dims)) == 1 and len(set(copies)) == 1:
        return pooled.view(batch, len(dims), copies[0], dims[0]).sum(2).reshape(batch, -1)
    starts = [sum(dims[:i]) for i in range(len(dims))]
    target = [s + j for s, d, k in zip(starts, dims, copies) for _ in range(k) for j in range(d)]
    columns = torch.tensor(target, device=pooled.device)
    return pooled.new_zeros(batch, sum(dims)).index_add_(1, columns, pooled)


def keyed(values: torch.Tensor, keys: list[str], dims: list[int]) -> KeyedTensor:
    """A ``KeyedTensor`` with the logical keys and dims over ``values`` of shape ``(B, sum(dims))``."""
    return KeyedTensor(keys=keys, length_per_key=dims, values=values)


def largest_fitting(fits: callable, low: int, high: int) -> int:  # type: ignore[valid-type]
    """The largest integer ``x`` in ``[low, high]`` with ``fits(x)``, for a monotone ``fits`` with ``fits(low)``."""
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low

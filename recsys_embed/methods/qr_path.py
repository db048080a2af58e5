"""``qr_path``: path-based compositional embeddings: the remainder picks a linear map applied to the quotient row.

Idea (Shi et al., KDD'20, "Compositional Embeddings Using Complementary Partitions", section 4.2, path-based
compositional embeddings): instead of combining the two partitions' vectors elementwise, the quotient ``x // b``
reads a row ``q`` of a table, and the remainder ``x % b`` chooses a small function (here a ``d x d`` linear map
``W_r``) applied to it: ``e(x) = W_{x % b} q_{x // b}``. Complementary partitions keep every id's path unique.

Storage: the quotient rows are a plain TorchRec table of ``ceil(n / b) x d`` (the table's own name), so they train
on fbgemm with the fused sparse optimizer and shard like a full table; the KJT only has its ids divided by ``b``.
The maps are a small dense parameter ``maps.{table}`` of shape ``(b, d, d)`` per table (``b ~ sqrt(n / d)``),
trained by the dense optimizer and replicated across ranks. As with ``qr``'s ``mult`` (and the authors' DLRM code),
each part is pooled over the bag before combining: a bag ``S`` gives ``(sum_{x in S} W_{x % b}) (sum_{x in S}
q_{x // b})``, which for one id per bag is exactly ``W_r q``. It is computed as ``sum_{x in S} W_{x % b} q_S``
with weighted ``torch.nn.functional.embedding_bag`` calls (forward and both gradients), never materialising a
``d x d`` matrix per id or per bag. The maps start at the identity, so the initial vectors have a full table's scale.

Memory: ``sum_t (b_t * d^2 + ceil(n_t / b_t) * d) * 4`` bytes. The budget solver gives each table its own base by
``qr``'s rule (:func:`recsys_embed.methods.solvers.allocate_bases`): one byte cap for every table, the largest
that fits; tables under it stay full, the others take the fewest collisions that fit it. A table never takes a base
past its fewest bytes (``b ~ sqrt(n / d)``), so every budget down to the sum of those minima (the true ceiling) is
met.

Example::

    emb = build_embedding("qr_path", tables, budget=Budget(ratio=10))
    emb = build_embedding("qr_path", tables, collisions=8)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.functional import embedding_bag
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import FP32_BYTES, Budget, check_tables, full_bytes
from recsys_embed.methods.layouts import keyed, make_kjt, per_value
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import RemapMethod
from recsys_embed.methods.solvers import BaseChoices, allocate_bases

log = logging.getLogger(__name__)


def path_bytes(n: int, d: int, base: int) -> int:
    """Bytes of one table: ``base`` maps of ``d x d`` plus ``ceil(n / base)`` quotient rows of ``d``."""
    return (base * d * d + -(-n // base) * d) * FP32_BYTES


def path_choices(n: int, d: int) -> BaseChoices:
    """The useful bases of an ``n``-id, ``d``-dim table: bases up to ``ceil(sqrt(n / d))`` suffice (past the real
    minimum of ``b d^2 + n d / b`` the ``d^2`` bytes per step of ``b`` outweigh the quotient rows it saves)."""
    top = math.isqrt(-(-n // d)) + 2
    bases = np.arange(1, top + 1, dtype=np.int64)
    return BaseChoices.from_costs((bases * d * d + -(-n // bases) * d) * FP32_BYTES)


class _ApplyMaps(torch.autograd.Function):
    """``out[s] = (sum_{i in bag s} maps[index[i]]) @ rows[s]`` for ``(R, d, d)`` maps and pooled ``(S, d)`` rows.

    Each of the three products (forward, gradient of the rows, gradient of the maps) is one weighted
    ``embedding_bag`` over ``d``-wide rows (``N * d`` lookups for ``N`` ids), so no ``(N, d, d)`` tensor is built:

    * forward: ``maps[r] @ q = sum_k q[k] * maps[r][:, k]``, the maps' columns weighted by the bag's ``q``;
    * rows: ``sum_i maps[r_i]^T g = sum_i sum_j g[j] * maps[r_i][j, :]``, the maps' rows weighted by the output's
      gradient, pooled per bag;
    * maps: ``grad maps[r][j, :] = sum_{i: index[i] = r} g_i[j] q_i``, bags ``(j, r)`` over the ids sorted by map.

    ``bag[i]`` is the bag of id ``i``, or None when every bag holds exactly one id (then ids and bags coincide).
    """

    @staticmethod
    def forward(
        ctx: Any,
        maps: torch.Tensor,
        rows: torch.Tensor,
        index: torch.Tensor,
        offsets: torch.Tensor,
        bag: torch.Tensor | None,
    ) -> torch.Tensor:
        d = maps.shape[-1]
        lookups = (index.unsqueeze(1) * d + torch.arange(d, device=index.device, dtype=index.dtype)).view(-1)
        per_id = rows if bag is None else rows.index_select(0, bag)
        ctx.save_for_backward(maps, per_id, index, offsets, lookups, bag)
        columns = maps.transpose(1, 2).reshape(-1, d)  # row r * d + k is column k of map r
        return embedding_bag(
            lookups, columns, offsets * d, mode="sum", per_sample_weights=per_id.reshape(-1), include_last_offset=True
        )  # reshape: ``rows`` is a strided column slice when one id per bag meets several runs of dims

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        maps, per_id, index, offsets, lookups, bag = ctx.saved_tensors
        count, d, ids = maps.shape[0], maps.shape[-1], index.numel()
        grad = grad.contiguous()
        grad_per_id = grad if bag is None else grad.index_select(0, bag)
        grad_maps = grad_rows = None
        if ctx.needs_input_grad[1]:
            grad_rows = embedding_bag(
                lookups,
                maps.reshape(-1, d),
                offsets * d,
                mode="sum",
                per_sample_weights=grad_per_id.view(-1),
                include_last_offset=True,
            )
        if ctx.needs_input_grad[0]:
            order = torch.sort(index).indices.to(index.dtype)
            starts = torch.zeros(count + 1, dtype=torch.int64, device=index.device)
            starts[1:] = torch.cumsum(torch.bincount(index, minlength=count), 0)
            # bag (j, r) sums per_id[i] * g_i[j] over the ids i of map r: the same sorted ids for every j
            bags = (torch.arange(d, device=index.device).unsqueeze(1) * ids + starts[:-1]).view(-1)
            summed = embedding_bag(
                order.expand(d, -1).reshape(-1),
                per_id,
                torch.cat([bags, bags.new_tensor([d * ids])]).to(index.dtype),
                mode="sum",
                per_sample_weights=grad_per_id.index_select(0, order).t().reshape(-1),
                include_last_offset=True,
            )
            grad_maps = summed.view(d, count, d).transpose(0, 1)
        return grad_maps, grad_rows, None, None, None


def _batch_major(lengths: torch.Tensor, ids: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For bags ``lengths`` of shape ``(F, B)`` (a KJT's feature-major order): the feature-major position of every
    id in batch-major order (bag ``(b, f)`` first by ``b``, as TorchRec's pooled output), the batch-major bag
    offsets, and the batch-major bag of every id (None when every bag holds one id)."""
    bags, device = lengths.numel(), lengths.device
    if not torch.compiler.is_exporting() and ids == bags and bool((lengths == 1).all()):  # (data-dependent)
        order = torch.arange(bags, device=device).view(lengths.shape).t().reshape(-1)
        return order, torch.arange(bags + 1, device=device), None
    by_batch = lengths.t().reshape(-1)
    offsets = torch.zeros(bags + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(by_batch, 0)
    first = (torch.cumsum(lengths.reshape(-1), 0) - lengths.reshape(-1)).view(lengths.shape).t().reshape(-1)
    bag = torch.repeat_interleave(torch.arange(bags, device=device), by_batch, output_size=ids)
    order = first[bag] + torch.arange(ids, device=device) - offsets[bag]
    return order, offsets, bag


@torch.fx.wrap
def _mapped_run(
    maps: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    maps_of_ids: torch.Tensor,
    per_key: list[int],
    first: int,
    end: int,
    batch: int,
) -> torch.Tensor:
    """``(B, count * d)``: features ``first .. end - 1`` (one run of equal dims) with their maps applied to their
    pooled quotient ``rows``; ``per_key`` ids per feature (an fx leaf: the ids' positions depend on the lengths)."""
    d, count = maps.shape[-1], end - first
    start, stop = sum(per_key[:first]), sum(per_key[:end])
    order, offsets, bag = _batch_major(lengths[first * batch : end * batch].view(count, batch), stop - start)
    index = maps_of_ids[start:stop][order]
    narrow = not torch.compiler.is_exporting() and (stop - start) * d < 2**31  # (a data-dependent test)
    if maps.shape[0] * d < 2**31 and narrow:  # int32 lookups: less memory traffic
        index, offsets = index.to(torch.int32), offsets.to(torch.int32)
    return _ApplyMaps.apply(maps, rows, index, offsets, bag).view(batch, count * d)


@register("qr_path")
class QRPathEmbedding(RemapMethod):
    """``e(x) = W_{x % b} q_{x // b}``: per-remainder dense ``d x d`` maps on quotient rows of a TorchRec table."""

    budget_knobs = ("collisions",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        collisions: int | Sequence[int] = 4,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        bases = [collisions] * len(self._tables) if isinstance(collisions, int) else list(collisions)
        if len(bases) != len(self._tables) or min(bases) < 1:
            raise ValueError(
                f"Method 'qr_path': collisions must be >= 1, one value or one per table (got {collisions})."
            )
        self.bases = bases
        dev = torch.device(device or "cpu")
        physical = [replace(t, num_embeddings=-(-t.num_embeddings // b)) for t, b in zip(self._tables, bases)]
        self.declare_remap([1] * len(self._feature_names))  # the quotient row; the maps are this method's combine
        self.tables = self.add_tables("tables", physical, device=dev)
        self.maps = nn.ParameterDict(
            {
                t.name: nn.Parameter(torch.eye(t.embedding_dim, device=dev).expand(b, -1, -1).contiguous())
                for t, b in zip(self._tables, bases)
            }
        )
        with torch.no_grad():
            for t in self._tables:
                bound = math.sqrt(1.0 / t.num_embeddings)
                self.tables.embedding_bags[t.name].weight.uniform_(-bound, bound)
        # runs of consecutive tables of one dim share one combine: (their tables, first feature, end feature)
        self._runs: list[tuple[list[int], int, int]] = []
        feature = 0
        for i, t in enumerate(self._tables):
            n = len(t.feature_names)
            if self._runs and self._tables[self._runs[-1][0][0]].embedding_dim == t.embedding_dim:
                run, first, end = self._runs[-1]
                self._runs[-1] = (run + [i], first, end + n)
            else:
                self._runs.append(([i], feature, feature + n))
            feature += n
        # per feature: its table's first map among the stacked maps of its run
        first_map = [
            sum(bases[j] for j in run[: run.index(i)])
            for run, _, _ in self._runs
            for i in run
            for _ in self._tables[i].feature_names
        ]
        base_of = {f: b for t, b in zip(self._tables, bases) for f in t.feature_names}
        self.register_buffer(
            "base", torch.tensor([base_of[f] for f in self._feature_names], device=dev), persistent=False
        )
        self.register_buffer("first_map", torch.tensor(first_map, device=dev), persistent=False)

    def _digits(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per id: its quotient row ``x // b`` and its map ``x % b`` (as a row of its run's stacked maps)."""
        values, base = features.values(), per_value(self.base, features)
        quotients = torch.div(values, base, rounding_mode="floor")
        return quotients, values - quotients * base + per_value(self.first_map, features)

    def id_map(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``(1, N)``: the quotient row ``x // b`` of every id (its map ``x % b`` is applied after pooling)."""
        return self._digits(features)[0].unsqueeze(0)

    def reference_rows(self, feature: str, id: int) -> list[int]:
        return [id // self.bases[self._table_index[self._feature_names.index(feature)]]]

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        batch, lengths, per_key = features.stride(), features.lengths(), features.length_per_key()
        quotients, maps_of_ids = self._digits(features)
        physical = make_kjt(features.keys(), quotients, lengths, batch)
        pooled = self.tables(physical).values()  # (B, sum d): each bag's pooled quotient rows, batch-major
        out, column = [], 0
        for run, first, end in self._runs:
            d, count = self._tables[run[0]].embedding_dim, end - first
            stacked = [self.maps[self._tables[i].name] for i in run]
            maps = torch.cat(stacked) if len(stacked) > 1 else stacked[0]
            rows = pooled[:, column : column + count * d].reshape(-1, d)  # a view when one run holds every table
            column += count * d
            out.append(_mapped_run(maps, rows, lengths, maps_of_ids, per_key, first, end, batch))
        return keyed(torch.cat(out, dim=1) if len(out) > 1 else out[0], self._feature_names, self._length_per_key)

    def memory_bytes(self) -> int:
        return sum(path_bytes(t.num_embeddings, t.embedding_dim, b) for t, b in zip(self._tables, self.bases))

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> QRPathEmbedding:
        """Per-table bases by ``qr``'s rule (:func:`~recsys_embed.methods.solvers.allocate_bases`: one byte cap for
        every table, the largest that fits)."""
        tables = check_tables(tables)
        allowed, full = budget.max_bytes(tables), full_bytes(tables)
        choices = [path_choices(t.num_embeddings, t.embedding_dim) for t in tables]
        bases = allocate_bases(choices, allowed)
        if bases is None:
            smallest = sum(int(c.costs[-1]) for c in choices)
            raise ValueError(
                f"Method 'qr_path' cannot fit {allowed} bytes (ratio {full / allowed:.1f}): the fewest bytes any "
                f"choice of per-table collisions reaches is {smallest} bytes (ratio {full / smallest:.1f}; each "
                f"table's fewest at b ~ sqrt(n / d)). Ask for at least {smallest} bytes, or use 'qr', whose "
                "partitions need no d x d maps."
            )
        method = cls(tables, **{**options, "collisions": bases})  # type: ignore[arg-type]
        log.info("qr_path: bases %s reach ratio %.2f (asked %s)", method.bases, method.compression_ratio(), budget)
        return method

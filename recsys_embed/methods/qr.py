"""``qr``: compositional embeddings from complementary partitions (quotient-remainder and its k-way form).

Idea (Shi et al., KDD'20, "Compositional Embeddings Using Complementary Partitions for Memory-Efficient
Recommendation Systems"): write id ``x`` in mixed radix with base ``b``: partition ``c < k - 1`` reads row
``(x // b^c) % b`` of its own small table, the last partition reads ``x // b^(k-1)``. For ``k = 2`` that is the
remainder ``x % b`` and the quotient ``x // b`` (``b`` = the number of collisions per quotient row). The partitions
are complementary, so every id keeps a unique combination and a unique embedding. The ``k`` vectors combine by
``mult`` (elementwise product, the paper's default), ``add`` or ``concat`` (each partition ``d / k`` wide). As in
the authors' DLRM ``QREmbeddingBag``, bags are pooled per partition before combining.

All ``k`` partitions of a table are stacked in one TorchRec table (partition ``c`` at a row offset), so one fbgemm
lookup serves all of them: ``mult`` reads them as ``k`` blocks of bags of the logical feature (bag ``c * B + b``
pools partition ``c`` of example ``b``; fbgemm's CPU kernels are faster on ``k * B`` bags than on ``k`` features),
``concat`` as ``k`` physical features ``f@c``, and ``add`` puts the ``k`` rows into the id's own bag so fbgemm's
pooling sums them. Ids use int64 integer division, never floats.

Memory: per table ``((k - 1) * b + ceil(n / b^(k-1))) * d' * 4`` bytes with ``d' = d`` (``d / k`` for concat).
With ``b = 1`` a table degenerates to a full table plus ``k - 1`` constant rows.

Budget solver (:func:`~recsys_embed.methods.solvers.allocate_bases`): each table gets its own base under one byte
cap for all tables, the largest cap whose total fits: a table that fits under the cap whole stays full (``b = 1``),
the others take the fewest collisions whose partitions fit the cap (the uniform setting of the paper and of the
authors' DLRM code, where small tables are left uncompressed). Every budget down to the sum of each table's fewest
bytes (``b ~ n^(1/k)``, the true ceiling for ``k`` partitions) is met. Without ``partitions=``, a budget below the
default's ceiling takes the fewest partitions that reach it (logged); a budget below every count's ceiling is an
error naming that ceiling.

Initialisation keeps the combined vector at a full table's scale (uniform ``±sqrt(1/n)``): ``mult`` starts the
non-quotient partitions at 1, ``add`` shrinks each partition by ``sqrt(k)``.

Example::

    emb = build_embedding("qr", tables, budget=Budget(ratio=10))                 # k = 2, operation "mult"
    emb = build_embedding("qr", tables, collisions=4, operation="add")
    emb = build_embedding("qr", tables, budget=Budget(ratio=100), partitions=3)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods.base import FP32_BYTES, TBE_DIM_MULTIPLE, Budget, check_tables, full_bytes
from recsys_embed.methods.layouts import IdLayout
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import Combine, RemapMethod
from recsys_embed.methods.solvers import BaseChoices, allocate_bases, ceil_root

log = logging.getLogger(__name__)
Operation = Literal["mult", "add", "concat"]
#: how each operation combines an id's k partition rows (the executor picks the physical layout from it)
COMBINE: dict[str, Combine] = {"mult": "product", "add": "sum", "concat": "concat"}


def partition_rows(n: int, base: int, k: int) -> int:
    """Rows of all ``k`` partitions of an ``n``-id table with base ``base``."""
    return (k - 1) * base + -(-n // base ** (k - 1))


def partition_choices(n: int, width: int, k: int) -> BaseChoices:
    """The useful bases of an ``n``-id table with ``k`` partitions of ``width`` columns.

    Bases up to ``ceil(n^(1/k))`` suffice: past the real minimum of ``(k - 1) b + n / b^(k-1)`` (at
    ``b = n^(1/k)``) the ``k - 1`` rows a step of ``b`` adds are at least the quotient rows it saves.
    """
    top = ceil_root(n, k) + 1
    if k == 2:  # up to ~sqrt(n) bases: vectorised
        bases = np.arange(1, top + 1, dtype=np.int64)
        rows = bases + -(-n // bases)
    else:
        rows = np.array([partition_rows(n, b, k) for b in range(1, top + 1)], dtype=np.int64)
    return BaseChoices.from_costs(rows * width * FP32_BYTES)


def max_useful_partitions(tables: Sequence[EmbeddingBagConfig]) -> int:
    """Past ``ceil(log2 n) + 1`` partitions every base of every table is beaten by the same base with one
    partition fewer (its last partition already has one row), so no table gets smaller."""
    return math.ceil(math.log2(max(t.num_embeddings for t in tables))) + 1


@register("qr")
class QREmbedding(RemapMethod):
    """Quotient-remainder / k-way complementary partitions; ``collisions`` is the base ``b``, one for every table
    or one per table (as the budget solver sets it)."""

    budget_knobs = ("collisions",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        collisions: int | Sequence[int] = 4,
        partitions: int = 2,
        operation: Operation = "mult",
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        if partitions < 2:
            raise ValueError(f"Method 'qr' needs partitions >= 2 (got {partitions}).")
        if operation not in ("mult", "add", "concat"):
            raise ValueError(f"Method 'qr': unknown operation {operation!r}; use 'mult', 'add' or 'concat'.")
        bases = [collisions] * len(self._tables) if isinstance(collisions, int) else list(collisions)
        if len(bases) != len(self._tables) or min(bases) < 1:
            raise ValueError(f"Method 'qr': collisions must be >= 1, one value or one per table (got {collisions}).")
        if operation == "concat" and any(t.embedding_dim % (partitions * TBE_DIM_MULTIPLE) for t in self._tables):
            raise ValueError(
                f"Method 'qr' with operation='concat' needs every embedding_dim divisible by "
                f"{TBE_DIM_MULTIPLE} * partitions = {TBE_DIM_MULTIPLE * partitions} (each partition's width must be a "
                "multiple of 4 for fbgemm); use 'mult' or 'add', or fewer partitions."
            )
        self.bases, self.partitions, self.operation = bases, partitions, operation
        k = partitions
        width = {t.name: t.embedding_dim // k if operation == "concat" else t.embedding_dim for t in self._tables}
        self.declare_remap([k] * len(self._feature_names), combine=COMBINE[operation])
        physical = []
        for t, base in zip(self._tables, bases):
            names = self.physical_features(t.feature_names)
            rows = partition_rows(t.num_embeddings, base, k)
            physical.append(replace(t, num_embeddings=rows, embedding_dim=width[t.name], feature_names=names))
        dev = torch.device(device or "cpu")
        self.tables = self.add_tables("tables", physical, device=dev)
        base_of = {f: b for t, b in zip(self._tables, bases) for f in t.feature_names}
        feature_bases = [base_of[f] for f in self._feature_names]
        self.register_buffer("base", torch.tensor(feature_bases, device=dev), persistent=False)
        # a base-1 table reads row c of partition c < k - 1 and its id in the last one: only the others divide
        self._divided = [i for i, b in enumerate(feature_bases) if b > 1]
        divided = torch.tensor(self._divided, dtype=torch.int64, device=dev)
        self.register_buffer("_divided_index", divided, persistent=False)
        first_rows = torch.tensor([[c * b for c in range(k)] for b in feature_bases], device=dev)  # (F, k)
        self.register_buffer("_first_rows", first_rows, persistent=False)
        self._initialise(physical)

    def _initialise(self, physical: list[EmbeddingBagConfig]) -> None:
        k = self.partitions
        with torch.no_grad():
            for t, base, table in zip(self._tables, self.bases, physical):
                weight = self.tables.embedding_bags[table.name].weight
                bound = math.sqrt(1.0 / t.num_embeddings)
                if self.operation == "mult":
                    weight.fill_(1.0)
                    weight[(k - 1) * base :].uniform_(-bound, bound)  # the quotient partition carries the scale
                else:
                    scale = 1.0 / math.sqrt(k) if self.operation == "add" else 1.0
                    weight.uniform_(-bound * scale, bound * scale)

    def id_map(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Partition ``c`` of an id reads row ``c * base + digit_c`` of the table's stacked partitions."""
        layout = IdLayout(features, self._divided or None)
        if not layout.uniform or len(self._divided) == len(self._feature_names):  # (k, N) or (k, F, L)
            return self._partition_rows(layout.ids, layout.spread(self.base))
        # (F, k, L), feature-major so that the rewrite's reshape is a view; base-1 tables need no division
        stored = self._first_rows.unsqueeze(-1).expand(-1, -1, layout.sizes[0]).clone()
        stored[:, -1] += layout.values.view(len(layout.sizes), -1)
        rows = stored.transpose(0, 1)
        if self._divided:
            rows.index_copy_(1, self._divided_index, self._partition_rows(layout.ids, layout.spread(self.base)))
        return rows

    def reference_rows(self, feature: str, id: int) -> list[int]:
        base = self.bases[self._table_index[self._feature_names.index(feature)]]
        rows, rest = [], id
        for c in range(self.partitions - 1):
            rows.append(c * base + rest % base)
            rest //= base
        return [*rows, (self.partitions - 1) * base + rest]

    def _partition_rows(self, ids: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``(k, *ids.shape)``: row ``c * base + digit_c`` of every partition (int64 floor division, exact)."""
        rows, rest = [], ids
        for c in range(self.partitions - 1):
            quotient = torch.div(rest, base, rounding_mode="floor")
            rows.append(c * base + (rest - quotient * base))  # the remainder, without a second division
            rest = quotient
        rows.append((self.partitions - 1) * base + rest)
        return torch.stack(rows)

    def memory_bytes(self) -> int:
        return self.table_bytes(self._tables, self.bases, self.partitions, self.operation)

    @staticmethod
    def table_bytes(tables: Sequence[EmbeddingBagConfig], bases: Sequence[int], k: int, operation: str) -> int:
        """The memory formula (used by the budget solver)."""
        return (
            sum(
                partition_rows(t.num_embeddings, b, k)
                * (t.embedding_dim // k if operation == "concat" else t.embedding_dim)
                for t, b in zip(tables, bases)
            )
            * FP32_BYTES
        )

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> QREmbedding:
        """Per-table bases (see :func:`allocate_bases`) for the fewest partitions whose tables fit the budget.

        With ``partitions`` given, only that many; without it, the constructor's default first, then more
        (logged) when the budget is below what the default can reach.
        """
        tables = check_tables(tables)
        resolved = cls.with_defaults(options)
        operation, first = str(resolved["operation"]), int(resolved["partitions"])
        if operation == "concat" and any(t.embedding_dim % (first * TBE_DIM_MULTIPLE) for t in tables):
            cls(tables, **{**options, "partitions": first})  # type: ignore[arg-type]  # raises the option error
        allowed, full = budget.max_bytes(tables), full_bytes(tables)

        def width(t: EmbeddingBagConfig, k: int) -> int:
            return t.embedding_dim // k if operation == "concat" else t.embedding_dim

        def usable(k: int) -> bool:  # concat needs widths of whole multiples of 4 (else the constructor refuses)
            return operation != "concat" or all(t.embedding_dim % (k * TBE_DIM_MULTIPLE) == 0 for t in tables)

        more = [k for k in range(first + 1, max(first, max_useful_partitions(tables)) + 1) if usable(k)]
        tried = [first] if "partitions" in options else [first, *more]
        ceilings: dict[int, int] = {}
        for k in tried:
            choices = [partition_choices(t.num_embeddings, width(t, k), k) for t in tables]
            bases = allocate_bases(choices, allowed)
            if bases is not None:
                if k != first:
                    log.info(
                        "qr: %d partitions reach at best %d bytes, above the budget of %d bytes: using %d partitions",
                        first,
                        ceilings[first],
                        allowed,
                        k,
                    )
                method = cls(tables, **{**options, "collisions": bases, "partitions": k})  # type: ignore[arg-type]
                log.info(
                    "qr: k=%d, bases %s reach ratio %.2f (asked %s)",
                    k,
                    method.bases,
                    method.compression_ratio(),
                    budget,
                )
                return method
            ceilings[k] = sum(int(c.costs[-1]) for c in choices)
        if len(tried) > 1:
            best = min(ceilings, key=lambda k: (ceilings[k], k))
            raise ValueError(
                f"Method 'qr' cannot fit {allowed} bytes (ratio {full / allowed:.1f}): the fewest bytes any choice of "
                f"per-table collisions reaches is {ceilings[best]} bytes (ratio {full / ceilings[best]:.1f}, with "
                f"partitions={best}). Ask for at least {ceilings[best]} bytes, or use another method."
            )
        k = first
        hint = "use another method"
        for other in more:
            need = sum(int(partition_choices(t.num_embeddings, width(t, other), other).costs[-1]) for t in tables)
            if need <= allowed:
                hint = (
                    f"use partitions={other} (reaches {need} bytes) or leave partitions unset to let the solver choose"
                )
                break
        raise ValueError(
            f"Method 'qr' with partitions={k} cannot fit {allowed} bytes (ratio {full / allowed:.1f}): the fewest "
            f"bytes any choice of per-table collisions reaches with {k} partitions is {ceilings[k]} bytes (ratio "
            f"{full / ceilings[k]:.1f}). Ask for at least {ceilings[k]} bytes, or {hint}."
        )

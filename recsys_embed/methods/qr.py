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
With ``b = 1`` a table degenerates to a full table plus ``k - 1`` constant rows (used for small tables). The budget
solver caps rows per table and picks, per table, the smallest base that fits the cap.

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

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods.base import FP32_BYTES, TBE_DIM_MULTIPLE, Budget, check_tables, full_bytes
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import Combine, IdLayout, RemapMethod, largest_fitting

log = logging.getLogger(__name__)
Operation = Literal["mult", "add", "concat"]
#: how each operation combines an id's k partition rows (the executor picks the physical layout from it)
COMBINE: dict[str, Combine] = {"mult": "product", "add": "sum", "concat": "concat"}


def partition_rows(n: int, base: int, k: int) -> int:
    """Rows of all ``k`` partitions of an ``n``-id table with base ``base``."""
    return (k - 1) * base + -(-n // base ** (k - 1))


def smallest_base(n: int, k: int, cap: int) -> int | None:
    """The smallest base whose partitions fit ``cap`` rows (fewest collisions), or None if none does.

    Rows are not monotone in the base for ``k >= 3``, so every base up to just past the k-th root is checked
    (rows only grow beyond it).
    """
    for base in range(1, math.ceil(n ** (1.0 / k)) + 2):
        if partition_rows(n, base, k) <= cap:
            return base
    return None


@register("qr")
class QREmbedding(RemapMethod):
    """Quotient-remainder / k-way complementary partitions; ``collisions`` is the base ``b`` for every table."""

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
        tables = check_tables(tables)
        k = int(options.get("partitions", 2))  # type: ignore[arg-type]
        operation = str(options.get("operation", "mult"))
        allowed = budget.max_bytes(tables)

        def bases_for(cap: int) -> list[int] | None:
            bases = [smallest_base(t.num_embeddings, k, cap) for t in tables]
            return None if None in bases else bases  # type: ignore[return-value]

        def fits(cap: int) -> bool:
            bases = bases_for(cap)
            return bases is not None and cls.table_bytes(tables, bases, k, operation) <= allowed

        floor_cap = max(
            min(partition_rows(t.num_embeddings, b, k) for b in range(1, math.ceil(t.num_embeddings ** (1.0 / k)) + 2))
            for t in tables
        )
        floor_bases = bases_for(floor_cap)
        smallest = cls.table_bytes(tables, floor_bases, k, operation)  # type: ignore[arg-type]
        if smallest > allowed:
            raise ValueError(
                f"Method 'qr' with {k} partitions cannot fit {allowed} bytes: the budget solver (one row cap for all "
                f"tables) reaches at least {smallest} bytes (ratio {full_bytes(tables) / smallest:.1f}). Ask for at "
                f"least {smallest} bytes, use more partitions (partitions={k + 1}), or set per-table collisions=[...]."
            )
        cap = largest_fitting(fits, floor_cap, max(t.num_embeddings for t in tables) + k)
        method = cls(tables, collisions=bases_for(cap), **options)  # type: ignore[arg-type]
        log.info("qr: k=%d, bases %s reach ratio %.2f (asked %s)", k, method.bases, method.compression_ratio(), budget)
        return method

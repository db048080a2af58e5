"""Logical tables and memory budgets: the one memory definition, and the checks every method's tables pass.

``full_bytes = sum(num_embeddings * embedding_dim * 4)`` over the logical tables; a :class:`Budget` is absolute
bytes or a compression ratio against that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

FP32_BYTES = 4


@dataclass(frozen=True)
class Budget:
    """An embedding memory budget: either absolute ``bytes`` or a compression ``ratio`` against full fp32 tables.

    Example::

        Budget(ratio=10)          # at most a tenth of the full tables' bytes
        Budget(bytes=64 * 2**20)  # at most 64 MiB
    """

    ratio: float | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.bytes is None):
            raise ValueError(
                f"Budget needs exactly one of ratio= or bytes= (got ratio={self.ratio}, bytes={self.bytes}); "
                "e.g. Budget(ratio=10) or Budget(bytes=2**26)."
            )
        if self.ratio is not None and not self.ratio >= 1:
            raise ValueError(f"Budget ratio must be >= 1 (got {self.ratio}); a ratio of 10 means 10x smaller.")
        if self.bytes is not None and self.bytes <= 0:
            raise ValueError(f"Budget bytes must be positive (got {self.bytes}).")

    def max_bytes(self, tables: Sequence[EmbeddingBagConfig]) -> int:
        """The largest ``memory_bytes()`` allowed for these logical tables."""
        if self.bytes is not None:
            return int(self.bytes)
        allowed = int(math.floor(full_bytes(tables) / float(self.ratio)))  # type: ignore[arg-type]
        if allowed < 1:
            raise ValueError(
                f"Budget ratio {self.ratio:g} leaves less than one byte for these tables ({full_bytes(tables)} bytes "
                f"in full): ask for a ratio of at most {full_bytes(tables)} (`recsys-embed methods` shows what each "
                "method reaches)."
            )
        return allowed


def full_bytes(tables: Sequence[EmbeddingBagConfig]) -> int:
    """Bytes of the uncompressed fp32 tables: ``sum(num_embeddings * embedding_dim * 4)``."""
    return sum(t.num_embeddings * t.embedding_dim * FP32_BYTES for t in tables)


def feature_names(tables: Sequence[EmbeddingBagConfig]) -> list[str]:
    """Feature keys in output order: tables in order, each table's features in order (as TorchRec's EBC)."""
    return [f for t in tables for f in t.feature_names]


def check_tables(tables: Sequence[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    """Validate logical tables; return them as a list."""
    tables = list(tables)
    if not tables:
        raise ValueError("No tables given: pass at least one EmbeddingBagConfig.")
    seen_tables: set[str] = set()
    seen_features: set[str] = set()
    for t in tables:
        if not isinstance(t, EmbeddingBagConfig):
            raise ValueError(f"Tables must be torchrec EmbeddingBagConfig objects, got {type(t).__name__}.")
        if not t.name or t.name in seen_tables:
            raise ValueError(f"Table names must be unique and non-empty; got {t.name!r} twice or empty.")
        if t.num_embeddings <= 0 or t.embedding_dim <= 0:
            raise ValueError(
                f"Table {t.name!r}: num_embeddings and embedding_dim must be positive "
                f"(got {t.num_embeddings} x {t.embedding_dim})."
            )
        if not t.feature_names:
            raise ValueError(f"Table {t.name!r} has no feature_names; set feature_names=[...].")
        if t.pooling != PoolingType.SUM:
            raise ValueError(
                f"Table {t.name!r} asks for {t.pooling.name} pooling; recsys_embed methods pool by SUM only (the "
                "fused and sharded kernels and every combine step assume it). Use PoolingType.SUM, and divide by "
                "the bag lengths in the model if you need a mean."
            )
        for f in t.feature_names:
            if f in seen_features:
                raise ValueError(f"Feature {f!r} is read by two tables; each feature must belong to one table.")
            seen_features.add(f)
        seen_tables.add(t.name)
    return tables

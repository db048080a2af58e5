"""The method interface: every compression method is a TorchRec-compatible embedding module.

A method is built from the *logical* tables a model expects (TorchRec ``EmbeddingBagConfig``s) and maps a
``KeyedJaggedTensor`` to a ``KeyedTensor`` with the same keys, order and dims as a full
``EmbeddingBagCollection``. What it stores to serve is reported by :meth:`EmbeddingMethod.memory_bytes`, the one
memory definition of the project::

    full_bytes = sum(num_embeddings * embedding_dim * 4)  over the logical tables
    ratio      = full_bytes / memory_bytes()

Methods whose storage is rows keep those rows in plain ``EmbeddingBagCollection`` children (the training layer
turns them into fbgemm table-batched kernels with a fused optimizer, or shards them with TorchRec), and express
themselves as an id remap of the KJT plus a cheap combine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

FP32_BYTES = 4
#: bytes of an int64 (hash seeds, stored ids)
INT64_BYTES = 8
#: fbgemm's table-batched kernels need every physical embedding dim to be a multiple of this
TBE_DIM_MULTIPLE = 4


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
        return int(math.floor(full_bytes(tables) / float(self.ratio)))  # type: ignore[arg-type]


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
        for f in t.feature_names:
            if f in seen_features:
                raise ValueError(f"Feature {f!r} is read by two tables; each feature must belong to one table.")
            seen_features.add(f)
        seen_tables.add(t.name)
    return tables


class EmbeddingMethod(nn.Module):
    """Base class of every compression method (TorchRec ``EmbeddingBagCollection`` interface).

    Subclasses implement :meth:`forward` and :meth:`memory_bytes`, take their options keyword-only, and may
    implement :meth:`from_budget` to solve their own knob for a :class:`Budget`.
    """

    #: the registered name (set by :func:`recsys_embed.methods.registry.register`)
    name: ClassVar[str] = ""
    #: the options a budget solver sets itself (giving one of them together with ``budget=`` is an error)
    budget_knobs: ClassVar[tuple[str, ...]] = ()
    #: whether the method needs per-id frequencies (``id_counts=``, from the data's ``id_counts.npz``)
    needs_id_counts: ClassVar[bool] = False

    def __init__(self, tables: Sequence[EmbeddingBagConfig], *, validate_ids: bool = True) -> None:
        super().__init__()
        self._tables = check_tables(tables)
        self._feature_names = feature_names(self._tables)
        self._length_per_key = [t.embedding_dim for t in self._tables for _ in t.feature_names]
        self._cardinality = {f: t.num_embeddings for t in self._tables for f in t.feature_names}
        self._table_of = {f: t.name for t in self._tables for f in t.feature_names}
        self._table_index = [i for i, t in enumerate(self._tables) for _ in t.feature_names]  # per feature
        self.validate_ids = validate_ids
        #: features whose ids may exceed the cardinality because the method hashes them (set by the method)
        self.unbounded_features: set[str] = set()

    # ---- the TorchRec EBC surface -------------------------------------------------------------------------
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The logical tables (what a full EBC would hold); models read feature names and dims from here."""
        return self._tables

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Check the keys (and ids unless ``validate_ids=False``), then :meth:`lookup` in table order."""
        features = self._keyed(features)
        if features.stride() == 0:  # TorchRec's collections cannot split an empty batch
            values = torch.zeros(0, sum(self._length_per_key), device=self.device)
            return KeyedTensor(keys=self._feature_names, length_per_key=self._length_per_key, values=values)
        return self.lookup(features)

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:  # pragma: no cover - abstract
        """The method itself: a checked KJT (keys in table order) -> pooled ``KeyedTensor``."""
        raise NotImplementedError

    # ---- memory -----------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes the method stores to serve (tables, codebooks, MLPs, hash parameters); no optimizer state."""
        raise NotImplementedError

    def full_bytes(self) -> int:
        return full_bytes(self._tables)

    def compression_ratio(self) -> float:
        return self.full_bytes() / self.memory_bytes()

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> EmbeddingMethod:
        """Build the method with its knob solved so that ``memory_bytes() <= budget``."""
        raise ValueError(
            f"Method {cls.name!r} has no budget solver: build it with explicit options instead of budget=."
        )

    # ---- input checks -----------------------------------------------------------------------------------------
    def _keyed(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Check keys (and ids unless disabled); return the KJT in the tables' feature order."""
        keys = features.keys()
        if keys != self._feature_names:
            missing = [f for f in self._feature_names if f not in keys]
            if missing:
                raise ValueError(
                    f"Input KeyedJaggedTensor lacks features {missing} that the tables read "
                    f"(got keys {keys}); build the batch with the same feature names as the tables."
                )
            features = features.permute([keys.index(f) for f in self._feature_names])
        if self.validate_ids:
            self._check_ids(features)
        return features

    def _check_ids(self, features: KeyedJaggedTensor) -> None:
        values = features.values()
        if values.numel() == 0:
            return
        if values.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Ids must be int64 (or int32) tensors, got {values.dtype}.")
        lengths = features.length_per_key()
        for key, chunk in zip(self._feature_names, torch.split(values, lengths)):
            if chunk.numel() == 0:
                continue
            low, high = int(chunk.min()), int(chunk.max())
            if low < 0:
                raise ValueError(
                    f"Feature {key!r} (table {self._table_of[key]!r}) has negative id {low}; ids must be >= 0. "
                    "Map missing values to a reserved id when preparing the data."
                )
            if key not in self.unbounded_features and high >= self._cardinality[key]:
                raise ValueError(
                    f"Feature {key!r} (table {self._table_of[key]!r}) has id {high} outside "
                    f"[0, {self._cardinality[key]}); raise num_embeddings in the table config, map rare/unseen ids "
                    "to an OOV id in the data, or use a hashing method."
                )

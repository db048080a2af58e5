"""Declared storage: what physical tables a method holds, and how the training layer may treat them.

A method declares each of its row tables with :meth:`EmbeddingMethod.add_tables` instead of leaving them to be
found by type. A declaration names the child module, whether its rows are pooled (a TorchRec
``EmbeddingBagCollection``, ``KJT -> KeyedTensor``) or unpooled (a TorchRec ``EmbeddingCollection``,
``KJT -> dict[str, JaggedTensor]``, one row per id), and :class:`TableOptions`: the weights' precision, stochastic
rounding, an optimizer of its own, or "method-owned" (the method updates the rows itself; the training layer
neither fuses nor shards them). :func:`recsys_embed.methods.fused.fuse_tables` and the sharding strategy act on
these declarations; everything else a method holds is small dense state, replicated and trained by the dense
optimizer.

Example::

    self.tables = self.add_tables("tables", physical, options=TableOptions(precision="fp16"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchrec import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_configs import DataType

Precision = Literal["fp32", "fp16", "int8", "int16"]
PRECISION_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1, "int16": 2}
#: integer rows: method-owned only (fbgemm's training kernels have no integer weights)
INTEGER_PRECISIONS = ("int8", "int16")
PRECISION_DATA_TYPE: dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16}
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")


@dataclass(frozen=True)
class SparseOptimizer:
    """The optimizer fused into the embedding tables (applied inside backward by fbgemm).

    ``rowwise_adagrad`` keeps one accumulator per row (the DLRM default); ``adagrad`` one per element; ``sgd``
    none; ``adam`` two per element (CUDA only: fbgemm's CPU kernels have no Adam).
    """

    name: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in SPARSE_OPTIMIZERS:
            raise ValueError(f"Unknown sparse optimizer {self.name!r}; choose one of {sorted(SPARSE_OPTIMIZERS)}.")
        if self.lr <= 0:
            raise ValueError(f"Sparse optimizer lr must be positive (got {self.lr}).")


@dataclass(frozen=True)
class TableOptions:
    """How the training layer treats one declared group of tables.

    Args:
        precision: the stored weights' precision (``fp16`` halves the bytes; fbgemm updates in fp32 and rounds;
            ``int8``/``int16`` rows are method-owned, e.g. ``quant``).
        stochastic_rounding: round fp16 updates stochastically (fbgemm's option; unbiased in expectation).
        optimizer: a sparse optimizer for these tables instead of the run's ``sparse_optimizer``.
        method_owned: the method updates these rows itself (e.g. integer rows); they are neither fused nor sharded
            and must not be TorchRec collections (the planner would shard them).
    """

    precision: Precision = "fp32"
    stochastic_rounding: bool = True
    optimizer: SparseOptimizer | None = None
    method_owned: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"Unknown table precision {self.precision!r}; choose one of {sorted(PRECISION_BYTES)}.")
        if self.precision in INTEGER_PRECISIONS and not self.method_owned:
            raise ValueError(
                f"Table precision {self.precision!r} needs method_owned=True: fbgemm's training kernels hold fp32 or "
                "fp16 rows only, so integer rows are updated by the method itself."
            )


@dataclass(frozen=True)
class TableStorage:
    """One declaration: the child module at ``path`` of the method holds ``configs`` (pooled or unpooled)."""

    path: str
    configs: tuple[EmbeddingBagConfig | EmbeddingConfig, ...]
    pooled: bool = True
    options: TableOptions = TableOptions()

    def bytes(self) -> int:
        """Stored bytes of the rows: ``sum(rows * dim) * bytes(precision)``."""
        per_value = PRECISION_BYTES[self.options.precision]
        return sum(t.num_embeddings * t.embedding_dim for t in self.configs) * per_value

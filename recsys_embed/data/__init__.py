"""Data: parquet/synthetic CTR data -> ``KeyedJaggedTensor`` batches; interaction graphs -> BPR batches.

The names are imported lazily: ``recsys_embed.data.schema`` (numpy and pyarrow only) is what the data scripts read,
and importing it must not load torch and Lightning (the batches and the data module do).
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "Batch": "batches",
    "ParquetBatches": "batches",
    "CTRDataModule": "datamodule",
    "GraphDataModule": "graph_datamodule",
    "InteractionGraph": "graph",
    "CTRSchema": "schema",
    "load_id_counts": "schema",
    "SyntheticConfig": "synthetic",
    "generate_synthetic": "synthetic",
    "synthetic_dataset": "synthetic",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

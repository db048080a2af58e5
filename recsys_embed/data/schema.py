"""The on-disk CTR layout: one parquet file per split plus ``schema.json`` and ``id_counts.npz``.

Columns follow TorchRec's naming: ``label`` (0/1), ``int_0..int_{D-1}`` (float dense features, already
transformed), ``cat_0..cat_{F-1}`` (int ids in ``[0, num_embeddings)``, one per row). ``schema.json`` names the
columns, their cardinalities and the splits; ``id_counts.npz`` holds, per categorical feature, how often each id
occurs in the train split (for frequency-aware methods).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SCHEMA_FILE = "schema.json"
COUNTS_FILE = "id_counts.npz"
FORMAT = "recsys_embed.ctr/1"
ROW_GROUP_ROWS = 65_536


@dataclass
class CTRSchema:
    """What a CTR dataset folder holds: label, dense and categorical columns, cardinalities, splits."""

    dense: list[str]
    sparse: list[str]
    cardinalities: dict[str, int]
    splits: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    label: str = "label"
    source: dict[str, object] = field(default_factory=dict)
    format: str = FORMAT

    @classmethod
    def load(cls, folder: str | Path) -> CTRSchema:
        path = Path(folder) / SCHEMA_FILE
        if not path.is_file():
            raise ValueError(
                f"No {SCHEMA_FILE} in {folder}: point data_dir at a folder written by a data script "
                "(python -m data_scripts.criteo ...) or leave data_dir unset to use the synthetic data."
            )
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path} has format {raw.get('format')!r}, expected {FORMAT!r}; re-run the data script.")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"{path} has unknown keys {unknown}; it was written by another version, re-run the script."
            )
        return cls(**raw)

    def save(self, folder: str | Path) -> None:
        Path(folder, SCHEMA_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    def split_path(self, folder: str | Path, split: str) -> Path:
        if split not in self.splits:
            raise ValueError(f"Dataset in {folder} has no split {split!r}; it has {sorted(self.splits)}.")
        return Path(folder) / self.splits[split]


def write_split(folder: str | Path, split: str, table: pa.Table) -> int:
    """Write one split's table to ``folder/{split}.parquet`` (row groups of 64k rows); return its rows."""
    path = Path(folder) / f"{split}.parquet"
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
    return table.num_rows


def count_ids(columns: dict[str, np.ndarray], cardinalities: dict[str, int]) -> dict[str, np.ndarray]:
    """Per-feature id occurrence counts (int64 arrays of length ``num_embeddings``)."""
    counts = {}
    for name, values in columns.items():
        if len(values) and (values.min() < 0 or values.max() >= cardinalities[name]):
            raise ValueError(
                f"Column {name!r} has ids in [{values.min()}, {values.max()}] outside [0, {cardinalities[name]}); "
                "the cardinality in the schema must exceed every id."
            )
        counts[name] = np.bincount(values, minlength=cardinalities[name]).astype(np.int64)
    return counts


def save_id_counts(folder: str | Path, counts: dict[str, np.ndarray]) -> None:
    np.savez_compressed(Path(folder) / COUNTS_FILE, **counts)


def load_id_counts(folder: str | Path) -> dict[str, np.ndarray]:
    """The train-split id counts per categorical feature, for frequency-aware methods."""
    path = Path(folder) / COUNTS_FILE
    if not path.is_file():
        raise ValueError(f"No {COUNTS_FILE} in {folder}; re-run the data script that wrote this folder.")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}

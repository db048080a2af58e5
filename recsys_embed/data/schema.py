"""The on-disk CTR layout: one parquet file per split plus ``schema.json`` and ``id_counts.npz``.

Columns follow TorchRec's naming: ``label`` (0/1), ``int_0..int_{D-1}`` (float dense features, already
transformed), ``cat_0..cat_{F-1}`` (int ids in ``[0, num_embeddings)``). A categorical column is either scalar
(an integer column: one id per row) or a list (``list<int64>``, any integer list type: a bag of ids per row, e.g.
tags or genres; an empty list is an empty bag). Which one is read from the parquet column type
(:func:`sparse_kinds`), so ``schema.json`` needs no extra key and older folders load unchanged. ``schema.json``
names the columns, their cardinalities and the splits; ``id_counts.npz`` holds, per categorical feature, how
often each id occurs in the train split (every id of every list counts), for frequency-aware methods.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
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


def _is_integer(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind)


def is_list_type(kind: pa.DataType) -> bool:
    """Whether an arrow type is a list column (``list`` or ``large_list``)."""
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def sparse_kinds(arrow_schema: pa.Schema, sparse: list[str], where: str = "the data") -> dict[str, bool]:
    """Each categorical column -> ``True`` for a list column, ``False`` for a scalar one, from its parquet type.

    Raises one ``ValueError`` naming the column and the fix for any other type (floats, strings, nested lists).
    """
    kinds = {}
    for name in sparse:
        if name not in arrow_schema.names:
            continue  # the reader reports missing columns together
        kind = arrow_schema.field(name).type
        if _is_integer(kind):
            kinds[name] = False
        elif is_list_type(kind) and _is_integer(kind.value_type):
            kinds[name] = True
        else:
            raise ValueError(
                f"Categorical column {name!r} in {where} has type {kind}; it must be an integer column (one id per "
                "row) or list<int64> (a bag of ids per row). Map the values to integer ids when preparing the data "
                "(e.g. pyarrow.compute.cast(column, pa.list_(pa.int64())))."
            )
    return kinds


def list_parts(name: str, column: pa.Array | pa.ChunkedArray, where: str = "the data") -> tuple[np.ndarray, np.ndarray]:
    """A list column as ``(offsets, values)`` int64 arrays: row ``i``'s ids are ``values[offsets[i]:offsets[i+1]]``.

    ``offsets`` has one entry per row plus one and starts at 0. Null lists and null ids inside lists raise a
    ``ValueError`` naming the column.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not is_list_type(array.type) or not _is_integer(array.type.value_type):
        raise ValueError(f"Column {name!r} in {where} has type {array.type}, expected list<int64>.")
    if array.null_count:
        raise ValueError(
            f"List column {name!r} in {where} has {array.null_count} null lists; write an empty list [] for a row "
            "without ids (an empty bag) when preparing the data."
        )
    offsets = np.asarray(array.offsets, dtype=np.int64)
    child = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if child.null_count:
        raise ValueError(
            f"List column {name!r} in {where} has {child.null_count} null ids inside its lists; drop them or map "
            "them to an id (e.g. a 'missing' id) when preparing the data."
        )
    return offsets - offsets[0], np.asarray(child.to_numpy(), dtype=np.int64)


def flat_ids(name: str, values: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Every id of a categorical column as one int64 array: a scalar column as is, a list column flattened."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if is_list_type(values.type):
            return list_parts(name, values)[1]
        return np.asarray(values.to_numpy(), dtype=np.int64)
    return np.asarray(values)


def count_ids(
    columns: Mapping[str, np.ndarray | pa.Array | pa.ChunkedArray], cardinalities: dict[str, int]
) -> dict[str, np.ndarray]:
    """Per-feature id occurrence counts (int64 arrays of length ``num_embeddings``).

    A column is an id array (one id per row) or an arrow list array (every id of every list counts).
    """
    counts = {}
    for name, column in columns.items():
        values = flat_ids(name, column)
        if len(values) and (values.min() < 0 or values.max() >= cardinalities[name]):
            raise ValueError(
                f"Column {name!r} has ids in [{values.min()}, {values.max()}] outside [0, {cardinalities[name]}); "
                "the cardinality in the schema must exceed every id."
            )
        counts[name] = np.bincount(values, minlength=cardinalities[name]).astype(np.int64)
    return counts


def save_id_counts(folder: str | Path, counts: dict[str, np.ndarray]) -> None:
    """Write the per-feature id counts to ``folder/id_counts.npz``."""
    np.savez_compressed(Path(folder) / COUNTS_FILE, **counts)


def load_id_counts(folder: str | Path) -> dict[str, np.ndarray]:
    """The train-split id counts per categorical feature, for frequency-aware methods."""
    path = Path(folder) / COUNTS_FILE
    if not path.is_file():
        raise ValueError(f"No {COUNTS_FILE} in {folder}; re-run the data script that wrote this folder.")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}

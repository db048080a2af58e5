"""The results store: one parquet row per finished cell, written atomically, merged across shards.

Layout of an output folder::

    OUTPUT/cells/<cell_id>.parquet   one file per finished cell (status ok, infeasible or failed)
    OUTPUT/runs/<cell_id>/           the cell's CSV training log
    OUTPUT/results.parquet           every row merged (written by the report, never read back)

The cell files are the results: a cell whose file is deleted is not done (a re-run runs it again), whatever
``results.parquet`` says. A row is written to a temporary name and moved into place with ``os.replace``, which is
atomic: a process killed at any moment (SIGKILL included) leaves either no file or a whole one, never a torn or
duplicated row, and a re-run skips the cells that have one. Shards of an array job write their own folders (or one
shared folder); the loader merges every ``cells/`` folder under a folder and keeps one row per cell (``ok`` over
``infeasible`` over ``failed``, then the newest).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

#: a finished cell's status: trained and tested / the method cannot reach the budget / an error
STATUSES = ("ok", "infeasible", "failed")
#: statuses that a re-run does not repeat (failed cells are retried)
DONE_STATUSES = frozenset({"ok", "infeasible"})

_S, _F, _I = pa.string(), pa.float64(), pa.int64()
#: one row per cell; JSON columns hold dicts (options, resolved knobs, stage times, versions, settings);
#: ``solver``: the solver version an infeasible row holds for (:func:`~recsys_embed.benchmark.identity.solver_version`)
SCHEMA = pa.schema(
    [
        ("cell_id", _S),
        ("sweep", _S),
        ("status", _S),
        ("reason", _S),
        ("dataset", _S),
        ("train_rows", _I),
        ("val_rows", _I),
        ("test_rows", _I),
        ("num_sparse", _I),
        ("num_dense", _I),
        ("model", _S),
        ("method", _S),
        ("method_label", _S),
        ("method_version", _I),
        ("options", _S),
        ("resolved", _S),
        ("solver", _S),
        ("budget_ratio", _F),
        ("ratio", _F),
        ("memory_bytes", _I),
        ("training_bytes", _I),
        ("full_bytes", _I),
        ("seed", _I),
        ("val_auc", _F),
        ("val_logloss", _F),
        ("test_auc", _F),
        ("test_logloss", _F),
        ("steps", _I),
        ("epochs", _I),
        ("train_time_s", _F),
        ("stage_times", _S),
        ("train_step_ms", _F),
        ("test_time_s", _F),
        ("inference_ms", _F),
        ("batch_size", _I),
        ("eval_batch_size", _I),
        ("embedding_dim", _I),
        ("max_steps", _I),
        ("max_epochs", _I),
        ("threads", _I),
        ("device", _S),
        ("host", _S),
        ("versions", _S),
        ("settings", _S),
        ("started_at", _S),
        ("finished_at", _S),
        ("wall_s", _F),
    ]
)
COLUMNS: list[str] = SCHEMA.names
CELLS_DIR = "cells"
MERGED_FILE = "results.parquet"


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temporary file and ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _as_table(rows: list[Mapping[str, Any]]) -> pa.Table:
    unknown = sorted({k for row in rows for k in row} - set(COLUMNS))
    if unknown:
        raise ValueError(f"Result row has unknown column(s) {unknown}; columns are {COLUMNS}.")
    for row in rows:
        if row.get("status") not in STATUSES:
            raise ValueError(f"Result row status must be one of {STATUSES} (got {row.get('status')!r}).")
        if not row.get("cell_id"):
            raise ValueError("Result row needs a cell_id.")
    return pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in rows], schema=SCHEMA)


class ResultStore:
    """The store of one output folder: write a cell's row, read every row under the folder.

    Example::

        store = ResultStore("runs/bench/default")
        store.write({"cell_id": "ab12...", "status": "ok", "test_auc": 0.80, ...})
        store.load()  # one row per cell file under the folder
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.cells_dir = self.root / CELLS_DIR

    def path_of(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.parquet"

    def write(self, row: Mapping[str, Any]) -> Path:
        """Write one finished cell's row (replacing an older row of the same cell) atomically."""
        path = self.path_of(str(row.get("cell_id")))
        _write_atomic(_as_table([row]), path)
        return path

    def load(self) -> pd.DataFrame:
        """Every row under this folder (all stores merged, one per cell)."""
        return load_results(self.root)


def _store_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    files = root.rglob(f"{CELLS_DIR}/*.parquet")
    return sorted(p for p in files if p.is_file() and not p.name.startswith("."))


def load_results(*roots: str | Path) -> pd.DataFrame:
    """Merge every cell file under ``roots`` (``cells/*.parquet`` of any shard; ``results.parquet`` is not read).

    Keeps one row per ``cell_id``: ``ok`` before ``infeasible`` before ``failed``, then the newest.
    """
    frames = []
    for root in roots:
        for path in _store_files(Path(root)):
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowInvalid) as error:
                log.warning("Skipping unreadable results file %s: %s", path, error)
                continue
            if "cell_id" not in table.column_names:
                continue
            frames.append(table.to_pandas())
    if not frames:
        return SCHEMA.empty_table().to_pandas()
    frame = pd.concat([f.reindex(columns=COLUMNS) for f in frames], ignore_index=True)
    rank = frame["status"].map({s: i for i, s in enumerate(STATUSES)}).fillna(len(STATUSES))
    frame = (
        frame.assign(_rank=rank)
        .sort_values(["_rank", "finished_at"], ascending=[True, False], na_position="last", kind="stable")
        .drop_duplicates("cell_id", keep="first")
        .drop(columns="_rank")
        .reset_index(drop=True)
    )
    return frame


def write_merged(frame: pd.DataFrame, root: str | Path) -> Path:
    """Write the merged rows to ``root/results.parquet`` (atomically)."""
    path = Path(root) / MERGED_FILE
    table = pa.Table.from_pandas(frame.reindex(columns=COLUMNS), schema=SCHEMA, preserve_index=False)
    _write_atomic(table, path)
    return path

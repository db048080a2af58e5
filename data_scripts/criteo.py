"""Criteo display-advertising logs -> the CTR parquet layout (``recsys_embed.data.schema``).

Input: the Criteo Kaggle challenge ``train.txt`` (45,840,617 lines) or the Criteo 1TB day files
``day_0 .. day_23`` (plain or ``.gz``). Both are tab-separated, without a header, 40 fields a line::

    label  I1 .. I13  C1 .. C26
    label: 0 or 1; I1..I13: integers (may be empty); C1..C26: hashed categories, hex strings of up to 8 digits
    (may be empty)

Command lines::

    recsys-embed data criteo --input train.txt --output data/criteo_kaggle
    recsys-embed data criteo --days day_* --output data/criteo_1tb --min-count 3

Output (``--output``): ``train/val/test.parquet``, ``schema.json`` and ``id_counts.npz`` with columns ``label``,
``int_0..int_12`` (I1..I13) and ``cat_0..cat_25`` (C1..C26).

* Dense features: ``log(max(x, 0) + 1)`` as float32, an empty field counting as 0. Negative values (a few rows
  have ``-1`` or ``-2`` in I2) are clipped to 0 first: the convention of DLRM's Criteo preprocessing.
* Categorical features, per column: id ``0`` is the out-of-vocabulary id (values seen fewer than ``--min-count``
  times in the train rows, and val/test values never kept from train), id ``1`` means the field was empty
  ("missing"), and ids ``2..`` are the kept values in ascending order of their hex value. Cardinality = kept + 2.
  ``--min-count`` defaults to 3; 1 keeps every train value (DLRM's setting), BARS/FuxiCTR use 10.
* Split (Criteo's rows are in time order): Kaggle ``train.txt``'s lines are cut into 7 consecutive "days" of
  equal size (the first ``lines % 7`` days one line longer, as ``numpy.array_split``); days 1-6 are train and
  day 7 is halved, the first half (one line longer when odd) val and the second half test, as in DLRM. With
  ``--days`` the day files are put in day order by their names, numbers compared as numbers (``day_2`` before
  ``day_10``, so a shell glob's order does not matter), every file but the last is train and the last day is
  halved into val and test.
  The split is by physical line position, so skipped malformed rows do not move the boundaries.

Malformed rows (a wrong number of fields, a label other than 0/1, a non-integer I field, a C field that is not
up to 8 hex digits) raise ``ValueError`` naming the file and line; with ``--skip-bad-rows`` they are dropped,
counted and the first few logged.

Work is done in blocks of ``--block-mb`` of text (pyarrow's streaming CSV reader, :mod:`data_scripts._stream`) with
vectorized numpy/pyarrow code and no Python object per row, in streaming passes: count the lines of the file holding
val/test (to place the split boundaries), count categorical values in the train rows (and validate every row), then
map and write. Memory: up to 48 bytes per distinct categorical value while counting (the full Kaggle set has ~33.8M
at ``--min-count 1``), 16 after, plus about 40 blocks of text in pyarrow's reader (~320 MB at the default ``--block-
mb 8``) and the arrays of one block, not the whole dataset. With ``--days`` (Criteo 1TB) the files are read one by
one in each pass, so only the vocabularies grow with the data.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from data_scripts._common import (
    BadRows,
    SplitWriter,
    atomic_output,
    count_lines,
    ctr_arrow_schema,
    natural_key,
    prepare_output,
    save_dataset,
    validate,
)
from data_scripts._stream import STREAM_BLOCK_BYTES, add_stream_arguments, stream_delimited, stream_options
from data_scripts._vocab import (
    OOV_ID,
    ValueCounter,
    check_splits,
    map_values,
    parse_decimal,
    parse_hex,
    write_split_rows,
)
from recsys_embed.data.schema import CTRSchema

log = logging.getLogger(__name__)

NUM_DENSE = 13
NUM_SPARSE = 26
INT_COLUMNS = [f"I{j}" for j in range(1, NUM_DENSE + 1)]
CAT_COLUMNS = [f"C{k}" for k in range(1, NUM_SPARSE + 1)]
COLUMNS = ["label", *INT_COLUMNS, *CAT_COLUMNS]
LAYOUT = "label, I1..I13, C1..C26; Criteo's unlabelled test files are not supported"
MISSING_ID = 1
FIRST_VALUE_ID = 2
SPLITS = ("train", "val", "test")
_NEVER = np.iinfo(np.int64).max


@dataclass
class CriteoRows:
    """Validated rows of one block: line numbers, labels, transformed dense ``(R, 13)``, raw hex values
    ``(26, R)`` as int64 (``-1`` for an empty field)."""

    lines: np.ndarray
    labels: np.ndarray
    dense: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class _Part:
    """One input file and where its lines go: ``line <= train_end`` train, ``<= val_end`` val, else test."""

    path: Path
    train_end: int
    val_end: int

    def split_codes(self, lines: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.array([self.train_end, self.val_end], dtype=np.int64), lines, side="left")


def read_criteo(path: str | Path, bad: BadRows, block_bytes: int = STREAM_BLOCK_BYTES) -> Iterator[CriteoRows]:
    """Stream a Criteo TSV file as validated, parsed blocks (dense already ``log(max(x, 0) + 1)``)."""
    rows = stream_delimited(path, COLUMNS, delimiter="\t", bad=bad, layout=LAYOUT, block_bytes=block_bytes)
    for table, lines in rows:
        label, label_ok = parse_decimal(table["label"])
        ints = [parse_decimal(table[c], empty=0) for c in INT_COLUMNS]
        cats = [parse_hex(table[c]) for c in CAT_COLUMNS]
        checks = [("label", "0 or 1", label_ok & ((label == 0) | (label == 1)))]
        checks += [(c, "an integer or empty", ok) for c, (_, ok) in zip(INT_COLUMNS, ints)]
        checks += [(c, "up to 8 hex digits or empty", ok) for c, (_, ok, _) in zip(CAT_COLUMNS, cats)]
        ok = np.logical_and.reduce([mask for _, _, mask in checks])
        table, kept = validate(table, lines, checks, path, bad)
        if not len(kept):
            continue
        dense = np.log1p(np.maximum(np.stack([v[ok] for v, _ in ints], axis=1), 0)).astype(np.float32)
        values = np.stack([np.where(empty, -1, v)[ok] for v, _, empty in cats])
        yield CriteoRows(kept, label[ok].astype(np.float32), dense, values)


def _plan(inputs: Sequence[Path], layout: str, block_bytes: int) -> list[_Part]:
    if layout == "kaggle":
        if len(inputs) != 1:
            raise ValueError(f"The Kaggle layout takes one train.txt, got {len(inputs)} files; use --days for 1TB.")
        total = count_lines(inputs[0], block_bytes)
        days = [total // 7 + (d < total % 7) for d in range(7)]
        train_end = sum(days[:6])
        parts = [_Part(Path(inputs[0]), train_end, train_end + (days[6] + 1) // 2)]
        sizes = [train_end, (days[6] + 1) // 2, days[6] // 2]
    elif layout == "days":
        if len(inputs) < 2:
            raise ValueError("--days needs at least two day files: train days and a last day halved into val/test.")
        last = count_lines(inputs[-1], block_bytes)
        parts = [_Part(Path(p), _NEVER, _NEVER) for p in inputs[:-1]]
        parts.append(_Part(Path(inputs[-1]), 0, (last + 1) // 2))
        sizes = [-1, (last + 1) // 2, last // 2]
    else:
        raise ValueError(f"layout must be 'kaggle' or 'days', got {layout!r}")
    for split, size in zip(SPLITS, sizes):
        if size == 0:
            raise ValueError(
                f"{inputs[-1]} has too few lines for a non-empty {split} split (Kaggle needs at least 14 lines, "
                "the last day file at least 2)."
            )
    return parts


def prepare_criteo(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    layout: Literal["kaggle", "days"] = "kaggle",
    min_count: int = 3,
    skip_bad_rows: bool = False,
    block_bytes: int = STREAM_BLOCK_BYTES,
    overwrite: bool = False,
) -> CTRSchema:
    """Convert Criteo TSV data into a CTR dataset folder (see the module docstring for every rule).

    Args:
        inputs: ``[train.txt]`` for ``layout="kaggle"``, or the day files (any order: sorted into day order by
            name, numbers compared as numbers) for ``layout="days"``.
        output: the dataset folder to write, atomically (:func:`~data_scripts._output.atomic_output`).
        min_count: categorical values seen fewer times in the train rows map to the OOV id 0.
        skip_bad_rows: drop malformed rows (counted and logged) instead of raising ``ValueError``.
        block_bytes: text read per block; memory scales with it.
        overwrite: replace ``output`` if it exists and is not empty (else that is a ``ValueError``).

    Returns:
        The saved :class:`CTRSchema`.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}.")
    inputs = [Path(p) for p in inputs]
    if layout == "days":
        inputs = sorted(inputs, key=natural_key)
        log.info("Day order: %s (the last is halved into val/test)", ", ".join(p.name for p in inputs))
    with atomic_output(output, overwrite=overwrite, inputs=inputs) as staging:
        return _write_criteo(
            inputs, staging, layout=layout, min_count=min_count, skip_bad_rows=skip_bad_rows, block_bytes=block_bytes
        )


def _write_criteo(
    inputs: Sequence[Path],
    output: Path,
    *,
    layout: Literal["kaggle", "days"],
    min_count: int,
    skip_bad_rows: bool,
    block_bytes: int,
) -> CTRSchema:
    """Read ``inputs`` (in day order) and write the dataset into ``output`` (the staging folder)."""
    parts = _plan(inputs, layout, block_bytes)
    folder = prepare_output(output)

    log.info("Pass 1/2: counting categorical values in the train rows (min_count=%d)", min_count)
    counters = [ValueCounter() for _ in range(NUM_SPARSE)]
    bad = BadRows(skip_bad_rows)
    for part in parts:
        for rows in read_criteo(part.path, bad, block_bytes):
            train = rows.lines <= part.train_end
            if train.any():
                for f in range(NUM_SPARSE):
                    values = rows.values[f, train]
                    counters[f].add(values[values >= 0])
    vocabularies = [counter.kept(min_count) for counter in counters]
    cardinalities = [len(v) + FIRST_VALUE_ID for v in vocabularies]
    del counters
    log.info("Cardinalities (OOV and missing ids included): %s", cardinalities)

    log.info("Pass 2/2: mapping ids and writing %s", folder)
    id_counts = [np.zeros(n, dtype=np.int64) for n in cardinalities]
    writers = {split: SplitWriter(folder, split, ctr_arrow_schema(NUM_DENSE, NUM_SPARSE)) for split in SPLITS}
    try:
        quiet = BadRows(skip_bad_rows, quiet=True)
        for part in parts:
            for rows in read_criteo(part.path, quiet, block_bytes):
                ids = np.stack(
                    [
                        map_values(rows.values[f], vocabularies[f], FIRST_VALUE_ID, rows.values[f] < 0, MISSING_ID)
                        for f in range(NUM_SPARSE)
                    ]
                )
                write_split_rows(writers, id_counts, part.split_codes(rows.lines), rows.labels, rows.dense, ids)
    finally:
        rows_written = {split: writer.close() for split, writer in writers.items()}
    check_splits(rows_written, bad)
    source: dict[str, object] = {
        "dataset": "criteo-kaggle" if layout == "kaggle" else "criteo-1tb",
        "script": "data_scripts.criteo",
        "inputs": [p.name for p in inputs],
        "min_count": min_count,
        "oov_id": OOV_ID,
        "missing_id": MISSING_ID,
        "dense_transform": "log(max(x, 0) + 1), empty -> 0",
        "split": "7 equal days by line: days 1-6 train, day 7 halved val/test"
        if layout == "kaggle"
        else "all files but the last train, last file halved val/test",
        "skipped_rows": bad.count,
        "columns": {
            **{f"int_{j}": c for j, c in enumerate(INT_COLUMNS)},
            **{f"cat_{k}": c for k, c in enumerate(CAT_COLUMNS)},
        },
    }
    return save_dataset(
        folder,
        num_dense=NUM_DENSE,
        cardinalities=cardinalities,
        rows=rows_written,
        id_counts=id_counts,
        source=source,
    )


SUMMARY = "Criteo Kaggle train.txt or Criteo 1TB day files"
EXAMPLES = """examples:
  recsys-embed data criteo --input train.txt --output data/criteo_kaggle
  recsys-embed data criteo --days day_* --output data/criteo_1tb"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``recsys-embed data criteo``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="the Kaggle train.txt (7-day split)")
    source.add_argument(
        "--days",
        type=Path,
        nargs="+",
        help="Criteo 1TB day files (any order: sorted by the day number in their names); the last day is halved "
        "into val/test",
    )
    add_stream_arguments(parser, min_count=3)


def run(args: argparse.Namespace) -> None:
    """Run ``recsys-embed data criteo`` with parsed ``args``."""
    prepare_criteo(
        [args.input] if args.input else args.days,
        args.output,
        layout="kaggle" if args.input else "days",
        **stream_options(args),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m data_scripts.criteo ...``: the same as ``recsys-embed data criteo ...``."""
    from data_scripts.cli import main as data_main

    data_main(["criteo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

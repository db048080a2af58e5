"""Avazu click-through logs (the Kaggle "Click-Through Rate Prediction" ``train`` file) -> the CTR parquet layout.

Input: the Kaggle ``train`` CSV (40,428,967 rows, 10 days, 2014-10-21 .. 2014-10-30, in time order; plain or
``.gz``), comma-separated, with this header line::

    id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,device_id,
    device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21

``click`` is 0 or 1; ``hour`` is ``YYMMDDHH``; site_*/app_*/device_id/device_ip/device_model are hashed values of
8 hex digits; the other columns are integers (``C20`` may be ``-1``). Kaggle's ``test`` file has no ``click``
column and is not supported.

Command lines::

    recsys-embed data avazu --input train.gz --output data/avazu                  # time split
    recsys-embed data avazu --input train.gz --output data/avazu_x4 --split random --seed 0

Output: ``label`` = click, no dense features, 23 categorical columns: ``cat_0`` hour of day (0..23) and ``cat_1``
weekday (0 = Monday .. 6), both from ``hour`` with fixed ids; ``cat_2..cat_22`` the 21 columns from ``C1`` to
``C21`` in file order (``source.columns`` names them). ``id`` is dropped. In each of those 21 columns, id 0 is
the out-of-vocabulary id (values seen fewer than ``--min-count`` times in the train rows, and val/test values
never kept from train) and ids ``1..`` are the kept values in ascending order (of the hex value, or the integer):
cardinality = kept + 1. ``--min-count`` defaults to 2 (FuxiCTR's Avazu_x4_001 setting); 1 keeps every value.

Split: ``--split time`` (default): every day but the last is train, and the last day's rows are halved in file
order, the first half (one row more when odd) val and the second test, as the compression benchmark of Zhang et
al. (VLDB 2024) does; the rows must be in time order (the Kaggle file is). ``--split random``: each row goes to
train/val/test with probability 8:1:1 from a seeded hash of its line number
(:func:`data_scripts._vocab.random_split_codes`), independent of the block size.

Malformed rows (not 24 fields, a click other than 0/1, an ``hour`` that is not a valid ``YYMMDDHH``, a hashed
column that is not 8 hex digits, an integer column that is not an integer) raise ``ValueError`` naming the file
and line; with ``--skip-bad-rows`` they are dropped, counted and the first few logged.

Streaming (:mod:`data_scripts._stream`): two passes over blocks of ``--block-mb`` of text, count values in the
train rows, then map and write. Memory: up to 48 bytes per distinct value while counting (Avazu has ~9.4M; the
time split counts the latest day apart until it is known to be the last), 16 bytes after, plus about 40 blocks of
text in pyarrow's reader (~320 MB at the default 8 MB) and the arrays of one block.
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
import pyarrow.compute as pc

from data_scripts._common import (
    BadRows,
    SplitWriter,
    atomic_output,
    ctr_arrow_schema,
    prepare_output,
    save_dataset,
    validate,
)
from data_scripts._stream import (
    STREAM_BLOCK_BYTES,
    add_stream_arguments,
    read_first_line,
    stream_delimited,
    stream_options,
)
from data_scripts._vocab import (
    OOV_ID,
    ValueCounter,
    check_splits,
    map_values,
    parse_decimal,
    parse_hex,
    random_split_codes,
    write_split_rows,
)
from recsys_embed.data.schema import CTRSchema

log = logging.getLogger(__name__)

HEX_COLUMNS = ["site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category"]
HEX_COLUMNS += ["device_id", "device_ip", "device_model"]
CATEGORICAL = ["C1", "banner_pos", *HEX_COLUMNS, "device_type", "device_conn_type", *(f"C{k}" for k in range(14, 22))]
COLUMNS = ["id", "click", "hour", *CATEGORICAL]
HEADER = ",".join(COLUMNS)
FEATURES = ["hour_of_day", "weekday", *CATEGORICAL]
LAYOUT = "the Avazu train header: " + HEADER
FIRST_VALUE_ID = 1
SPLITS = ("train", "val", "test")
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (0 = Monday)


@dataclass
class AvazuRows:
    """Validated rows of one block: line numbers, labels, day (days since 1970-01-01), hour of day, weekday, and
    the 21 categorical columns' integer keys ``(21, R)``."""

    lines: np.ndarray
    labels: np.ndarray
    days: np.ndarray
    hour_of_day: np.ndarray
    weekday: np.ndarray
    keys: np.ndarray


def parse_hour(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``YYMMDDHH`` strings as ``(days since 1970-01-01, hour of day, ok)``; 20YY, a real calendar date."""
    value, ok = parse_decimal(column)
    ok &= value >= 0
    ok &= pc.binary_length(column).to_numpy(zero_copy_only=False) == 8
    year, month = 2000 + value // 1_000_000, value // 10_000 % 100
    day, hour = value // 100 % 100, value % 100
    ok &= (month >= 1) & (month <= 12) & (day >= 1) & (day <= 31) & (hour <= 23)
    months = (np.where(ok, (year - 1970) * 12 + month - 1, 0)).astype("datetime64[M]")
    days = months.astype("datetime64[D]") + np.where(ok, day - 1, 0)
    ok &= days.astype("datetime64[M]") == months  # 31 April is not a date
    return days.astype(np.int64), hour, ok


def _hex_keys(column) -> tuple[np.ndarray, np.ndarray]:
    """Hashed values (8 hex digits) as ``(int64 keys, ok)``; an empty field is not ok."""
    values, ok, empty = parse_hex(column)
    return values, ok & ~empty


def check_header(path: str | Path) -> None:
    """Refuse a file whose first line is not the Avazu train header."""
    first = read_first_line(path).decode("latin-1")
    if first == HEADER:
        return
    if first.split(",")[:2] == ["id", "hour"]:
        raise ValueError(f"{path} has no click column: Kaggle's unlabelled Avazu test file is not supported.")
    raise ValueError(f"{path}, line 1: expected the Avazu header {HEADER!r}, got {first[:300]!r}.")


def read_avazu(path: str | Path, bad: BadRows, block_bytes: int = STREAM_BLOCK_BYTES) -> Iterator[AvazuRows]:
    """Stream the Avazu train CSV as validated, parsed blocks."""
    check_header(path)
    blocks = stream_delimited(
        path, COLUMNS, delimiter=",", bad=bad, layout=LAYOUT, block_bytes=block_bytes, header_lines=1
    )
    for table, lines in blocks:
        click, click_ok = parse_decimal(table["click"])
        days, hour, hour_ok = parse_hour(table["hour"])
        keys = [_hex_keys(table[c]) if c in HEX_COLUMNS else parse_decimal(table[c]) for c in CATEGORICAL]
        checks = [("click", "0 or 1", click_ok & ((click == 0) | (click == 1))), ("hour", "YYMMDDHH", hour_ok)]
        checks += [
            (c, "8 hex digits" if c in HEX_COLUMNS else "an integer", ok) for c, (_, ok) in zip(CATEGORICAL, keys)
        ]
        ok = np.logical_and.reduce([mask for _, _, mask in checks])
        _, kept = validate(table, lines, checks, path, bad)
        if not len(kept):
            continue
        yield AvazuRows(
            kept,
            click[ok].astype(np.float32),
            days[ok],
            hour[ok],
            (days[ok] + _EPOCH_WEEKDAY) % 7,
            np.stack([k[ok] for k, _ in keys]),
        )


class _TimeCounts:
    """Pass 1 of the time split: counts of the days before the latest day seen, and of the latest day apart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.before = [ValueCounter() for _ in CATEGORICAL]
        self.latest = [ValueCounter() for _ in CATEGORICAL]
        self.latest_day: int | None = None
        self.day_rows: dict[int, int] = {}

    def add(self, rows: AvazuRows) -> None:
        previous = np.concatenate([[self.latest_day if self.latest_day is not None else rows.days[0]], rows.days])
        back = np.flatnonzero(np.diff(previous) < 0)
        if len(back):
            day = np.datetime64(int(previous[back[0]]), "D")
            raise ValueError(
                f"{self.path}, line {int(rows.lines[back[0]])}: its hour is on a day before the previous row's "
                f"({day}); the time split needs rows in time order (Kaggle's train file is): sort the file by "
                "hour or use --split random."
            )
        for day in np.unique(rows.days).tolist():
            if self.latest_day is not None and day > self.latest_day:
                for before, latest in zip(self.before, self.latest):
                    before.add_counts(*latest.merged())
                self.latest = [ValueCounter() for _ in CATEGORICAL]
            self.latest_day = day
            mask = rows.days == day
            self.day_rows[day] = self.day_rows.get(day, 0) + int(mask.sum())
            for f, counter in enumerate(self.latest):
                counter.add(rows.keys[f, mask])


def prepare_avazu(
    source: str | Path,
    output: str | Path,
    *,
    split: Literal["time", "random"] = "time",
    seed: int = 0,
    min_count: int = 2,
    skip_bad_rows: bool = False,
    block_bytes: int = STREAM_BLOCK_BYTES,
    overwrite: bool = False,
) -> CTRSchema:
    """Convert the Avazu train CSV into a CTR dataset folder (see the module docstring for every rule).

    ``output`` is written atomically; an existing non-empty folder is refused unless ``overwrite``. Returns the
    saved schema.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}.")
    if split not in ("time", "random"):
        raise ValueError(f"split must be 'time' or 'random', got {split!r}.")
    source = Path(source)
    with atomic_output(output, overwrite=overwrite, inputs=[source]) as staging:
        return _write_avazu(source, prepare_output(staging), split, seed, min_count, skip_bad_rows, block_bytes)


def _write_avazu(
    source: Path, folder: Path, split: str, seed: int, min_count: int, skip_bad_rows: bool, block_bytes: int
) -> CTRSchema:
    log.info("Pass 1/2: counting values in the train rows of %s (min_count=%d)", source, min_count)
    bad = BadRows(skip_bad_rows)
    time_counts = _TimeCounts(source)
    for rows in read_avazu(source, bad, block_bytes):
        if split == "time":
            time_counts.add(rows)
        else:
            train = random_split_codes(rows.lines, seed) == 0
            for f, counter in enumerate(time_counts.before):
                counter.add(rows.keys[f, train])
    if split == "time":
        if len(time_counts.day_rows) < 2:
            raise ValueError(f"{source} holds {len(time_counts.day_rows)} day(s); the time split needs at least 2.")
        last_day, last_rows = time_counts.latest_day, time_counts.day_rows[time_counts.latest_day]
        val_rows = (last_rows + 1) // 2
        log.info("Last day %s: %d rows, %d val", np.datetime64(last_day, "D"), last_rows, val_rows)
    vocabularies = [counter.kept(min_count) for counter in time_counts.before]
    del time_counts
    cardinalities = [24, 7, *(len(v) + FIRST_VALUE_ID for v in vocabularies)]
    log.info("Cardinalities (OOV id included): %s", cardinalities)

    log.info("Pass 2/2: mapping ids and writing %s", folder)
    id_counts = [np.zeros(n, dtype=np.int64) for n in cardinalities]
    writers = {name: SplitWriter(folder, name, ctr_arrow_schema(0, len(FEATURES))) for name in SPLITS}
    last_seen = 0
    try:
        for rows in read_avazu(source, BadRows(skip_bad_rows, quiet=True), block_bytes):
            ids = np.stack(
                [
                    rows.hour_of_day,
                    rows.weekday,
                    *(map_values(k, v, FIRST_VALUE_ID) for k, v in zip(rows.keys, vocabularies)),
                ]
            )
            if split == "time":
                on_last = rows.days == last_day
                rank = last_seen + np.cumsum(on_last) - 1
                last_seen += int(on_last.sum())
                codes = np.where(on_last, np.where(rank < val_rows, 1, 2), 0)
            else:
                codes = random_split_codes(rows.lines, seed)
            write_split_rows(writers, id_counts, codes, rows.labels, np.empty((len(rows.lines), 0)), ids)
    finally:
        rows_written = {name: writer.close() for name, writer in writers.items()}
    check_splits(rows_written, bad)
    source_info: dict[str, object] = {
        "dataset": "avazu",
        "script": "data_scripts.avazu",
        "inputs": [source.name],
        "min_count": min_count,
        "oov_id": OOV_ID,
        "split": "time: days before the last train, last day halved val/test in file order"
        if split == "time"
        else f"random 8:1:1 by a hash of the line number, seed {seed}",
        "skipped_rows": bad.count,
        "columns": {f"cat_{k}": name for k, name in enumerate(FEATURES)},
    }
    return save_dataset(
        folder, num_dense=0, cardinalities=cardinalities, rows=rows_written, id_counts=id_counts, source=source_info
    )


SUMMARY = "Avazu (Kaggle CTR prediction) train CSV"
EXAMPLES = """examples:
  recsys-embed data avazu --input train.gz --output data/avazu
  recsys-embed data avazu --input train.gz --output data/avazu_random --split random --seed 0"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``recsys-embed data avazu``."""
    parser.add_argument("--input", type=Path, required=True, help="the Kaggle train CSV (plain or .gz)")
    parser.add_argument(
        "--split",
        choices=["time", "random"],
        default="time",
        help="time: last day halved into val/test (default); random: seeded 8:1:1",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    add_stream_arguments(parser, min_count=2)


def run(args: argparse.Namespace) -> None:
    """Run ``recsys-embed data avazu`` with parsed ``args``."""
    prepare_avazu(
        args.input,
        args.output,
        split=args.split,
        seed=args.seed,
        **stream_options(args),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m data_scripts.avazu ...``: the same as ``recsys-embed data avazu ...``."""
    from data_scripts.cli import main as data_main

    data_main(["avazu", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

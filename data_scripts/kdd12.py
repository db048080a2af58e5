"""KDD Cup 2012 track 2 (search-ad click logs of Tencent's soso.com) -> the CTR parquet layout.

Input: ``training.txt`` (149,639,105 lines; plain or ``.gz``), tab-separated, no header, 12 integer fields::

    click  impression  display_url  ad_id  advertiser_id  depth  position  query_id  keyword_id  title_id
    description_id  user_id

``click`` >= 0 clicks out of ``impression`` >= 1 impressions of that ad in that context; ``display_url`` is a
64-bit hash (up to 20 digits), the others are non-negative ids. Optional side file ``--user-profile``
(``userid_profile.txt``: ``user_id  gender  age``, gender 0..2, age 0..6) adds two features. The token files
(query/title/description/keyword -> token ids) are not read.

Command lines::

    recsys-embed data kdd12 --input training.txt --output data/kdd12
    recsys-embed data kdd12 --input training.txt --user-profile userid_profile.txt --expand-impressions \\
        --output data/kdd12_expanded

Output: no dense features; ``cat_0..cat_9`` = display_url .. user_id in file order (``source.columns``), then with
``--user-profile`` ``cat_10`` gender and ``cat_11`` age (id = value + 1; id 0 = the user has no profile row).
Label: ``click > 0`` (one row per line, the usual setting); with ``--expand-impressions`` each line becomes
``impression`` rows, ``click`` of them positive (label 1) and the rest negative: one row per impression. In each
of the 10 log columns id 0 is the out-of-vocabulary id (values seen fewer than ``--min-count`` times in the train
rows, counting each impression when expanded, and val/test values never kept from train) and ids ``1..`` are the
kept values in ascending order; cardinality = kept + 1. ``--min-count`` defaults to 10 (our choice; the log is
149M lines of long-tailed ids), 1 keeps every value.

Split: the file has no time field, so each line goes to train/val/test with probability 8:1:1 from a seeded hash
of its line number (:func:`data_scripts._vocab.random_split_codes`; the rows of an expanded line stay together).

Malformed rows (not 12 fields, a field that is not a non-negative integer, ``impression`` 0, more clicks than
impressions) raise ``ValueError`` naming the file and line; with ``--skip-bad-rows`` they are dropped, counted and
the first few logged. Streaming (:mod:`data_scripts._stream`): two passes (count, then map and write); memory up
to 48 bytes per distinct value while counting, 16 after, about 40 blocks of text in pyarrow's reader (~320 MB at
the default ``--block-mb 8``), the arrays of one block, and 10 bytes per user of the profile file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_scripts._common import (
    BadRows,
    SplitWriter,
    atomic_output,
    ctr_arrow_schema,
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
    random_split_codes,
    write_split_rows,
)
from recsys_embed.data.schema import CTRSchema

log = logging.getLogger(__name__)

KEYS = ["display_url", "ad_id", "advertiser_id", "depth", "position", "query_id", "keyword_id", "title_id"]
KEYS += ["description_id", "user_id"]
COLUMNS = ["click", "impression", *KEYS]
LAYOUT = "click, impression, " + ", ".join(KEYS)
PROFILE_COLUMNS = ["user_id", "gender", "age"]
PROFILE_CARDINALITIES = {"gender": 4, "age": 8}  # value + 1, and 0 for a user without a profile row
FIRST_VALUE_ID = 1
SPLITS = ("train", "val", "test")


@dataclass
class KDDRows:
    """Validated lines of one block: line numbers, clicks, impressions and the 10 columns' keys ``(10, R)``."""

    lines: np.ndarray
    clicks: np.ndarray
    impressions: np.ndarray
    keys: np.ndarray


def read_kdd12(path: str | Path, bad: BadRows, block_bytes: int = STREAM_BLOCK_BYTES) -> Iterator[KDDRows]:
    """Stream ``training.txt`` as validated, parsed blocks (keys as uint64)."""
    for table, lines in stream_delimited(
        path, COLUMNS, delimiter="\t", bad=bad, layout=LAYOUT, block_bytes=block_bytes
    ):
        clicks, click_ok = parse_decimal(table["click"], unsigned=True)
        impressions, impression_ok = parse_decimal(table["impression"], unsigned=True)
        keys = [parse_decimal(table[c], unsigned=True) for c in KEYS]
        checks = [
            ("click", "a non-negative integer", click_ok),
            ("impression", "a positive integer", impression_ok & (impressions >= 1)),
            ("click", "at most the impression count", ~(click_ok & impression_ok) | (clicks <= impressions)),
        ]
        checks += [(c, "a non-negative integer (at most 2**64 - 1)", ok) for c, (_, ok) in zip(KEYS, keys)]
        ok = np.logical_and.reduce([mask for _, _, mask in checks])
        _, kept = validate(table, lines, checks, path, bad)
        if len(kept):
            yield KDDRows(
                kept, clicks[ok].astype(np.int64), impressions[ok].astype(np.int64), np.stack([k[ok] for k, _ in keys])
            )


def read_profiles(path: str | Path, bad: BadRows, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``userid_profile.txt`` as ``(sorted user ids uint64, (2, U) gender/age ids)`` (value + 1)."""
    users, features = [], []
    layout = ", ".join(PROFILE_COLUMNS)
    for table, lines in stream_delimited(
        path, PROFILE_COLUMNS, delimiter="\t", bad=bad, layout=layout, block_bytes=block_bytes
    ):
        user, user_ok = parse_decimal(table["user_id"], unsigned=True)
        gender, gender_ok = parse_decimal(table["gender"])
        age, age_ok = parse_decimal(table["age"])
        checks = [
            ("user_id", "a non-negative integer", user_ok),
            ("gender", "0, 1 or 2", gender_ok & (gender >= 0) & (gender <= 2)),
            ("age", "0 to 6", age_ok & (age >= 0) & (age <= 6)),
        ]
        ok = np.logical_and.reduce([mask for _, _, mask in checks])
        validate(table, lines, checks, path, bad)
        users.append(user[ok])
        features.append(np.stack([gender[ok] + 1, age[ok] + 1]).astype(np.int8))
    user = np.concatenate(users) if users else np.empty(0, np.uint64)
    if not len(user):
        raise ValueError(f"{path} has no valid rows.")
    feature = np.concatenate(features, axis=1)
    order = np.argsort(user, kind="stable")
    user, feature = user[order], feature[:, order]
    twice = np.flatnonzero(user[1:] == user[:-1])
    if len(twice):
        raise ValueError(f"{path}: user {int(user[twice[0]])} has two profile rows; keep one row per user.")
    return user, feature


def profile_ids(users: np.ndarray, profile_users: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """Gender and age ids ``(2, R)`` of each row's user; 0 for a user without a profile row."""
    pos = np.minimum(np.searchsorted(profile_users, users), len(profile_users) - 1)
    found = profile_users[pos] == users
    return np.where(found, profile[:, pos], 0).astype(np.int64)


def expand(rows: KDDRows, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per impression: ``(labels, row index into the block, split codes)``."""
    index = np.repeat(np.arange(len(rows.lines)), rows.impressions)
    starts = np.cumsum(rows.impressions) - rows.impressions
    position = np.arange(len(index)) - starts[index]
    return (position < rows.clicks[index]).astype(np.float32), index, codes[index]


def prepare_kdd12(
    source: str | Path,
    output: str | Path,
    *,
    user_profile: str | Path | None = None,
    expand_impressions: bool = False,
    seed: int = 0,
    min_count: int = 10,
    skip_bad_rows: bool = False,
    block_bytes: int = STREAM_BLOCK_BYTES,
    overwrite: bool = False,
) -> CTRSchema:
    """Convert KDD Cup 2012 track 2 ``training.txt`` into a CTR dataset folder (rules: the module docstring)."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}.")
    source = Path(source)
    inputs = [source] + ([Path(user_profile)] if user_profile else [])
    with atomic_output(output, overwrite=overwrite, inputs=inputs) as staging:
        folder = prepare_output(staging)
        bad = BadRows(skip_bad_rows)
        profile = read_profiles(user_profile, bad, block_bytes) if user_profile else None

        log.info("Pass 1/2: counting values in the train rows of %s (min_count=%d)", source, min_count)
        counters = [ValueCounter() for _ in KEYS]
        for rows in read_kdd12(source, bad, block_bytes):
            train = random_split_codes(rows.lines, seed) == 0
            for f, counter in enumerate(counters):
                counter.add(rows.keys[f, train], rows.impressions[train] if expand_impressions else None)
        vocabularies = [counter.kept(min_count) for counter in counters]
        del counters
        cardinalities = [len(v) + FIRST_VALUE_ID for v in vocabularies]
        cardinalities += list(PROFILE_CARDINALITIES.values()) if profile else []
        log.info("Cardinalities (OOV id included): %s", cardinalities)

        log.info("Pass 2/2: mapping ids and writing %s", folder)
        id_counts = [np.zeros(n, dtype=np.int64) for n in cardinalities]
        writers = {name: SplitWriter(folder, name, ctr_arrow_schema(0, len(cardinalities))) for name in SPLITS}
        try:
            for rows in read_kdd12(source, BadRows(skip_bad_rows, quiet=True), block_bytes):
                ids = [map_values(k, v, FIRST_VALUE_ID) for k, v in zip(rows.keys, vocabularies)]
                if profile:
                    ids.extend(profile_ids(rows.keys[KEYS.index("user_id")], *profile))
                ids = np.stack(ids)
                codes = random_split_codes(rows.lines, seed)
                if expand_impressions:
                    labels, index, codes = expand(rows, codes)
                    ids = ids[:, index]
                else:
                    labels = (rows.clicks > 0).astype(np.float32)
                write_split_rows(writers, id_counts, codes, labels, np.empty((len(labels), 0)), ids)
        finally:
            rows_written = {name: writer.close() for name, writer in writers.items()}
        check_splits(rows_written, bad)
        features = KEYS + (list(PROFILE_CARDINALITIES) if profile else [])
        info: dict[str, object] = {
            "dataset": "kdd12-track2",
            "script": "data_scripts.kdd12",
            "inputs": [p.name for p in inputs],
            "min_count": min_count,
            "oov_id": OOV_ID,
            "label": "one row per impression, click count positive" if expand_impressions else "click > 0",
            "split": f"random 8:1:1 by a hash of the line number, seed {seed}",
            "skipped_rows": bad.count,
            "columns": {f"cat_{k}": name for k, name in enumerate(features)},
        }
        return save_dataset(
            folder, num_dense=0, cardinalities=cardinalities, rows=rows_written, id_counts=id_counts, source=info
        )


SUMMARY = "KDD Cup 2012 track 2 training.txt (+ userid_profile.txt)"
EXAMPLES = """examples:
  recsys-embed data kdd12 --input training.txt --output data/kdd12
  recsys-embed data kdd12 --input training.txt --user-profile userid_profile.txt --output data/kdd12_users"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``recsys-embed data kdd12``."""
    parser.add_argument("--input", type=Path, required=True, help="training.txt (plain or .gz)")
    parser.add_argument("--user-profile", type=Path, help="userid_profile.txt: adds gender and age features")
    parser.add_argument(
        "--expand-impressions", action="store_true", help="one row per impression instead of one per line"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random 8:1:1 split (default 0)")
    add_stream_arguments(parser, min_count=10)


def run(args: argparse.Namespace) -> None:
    """Run ``recsys-embed data kdd12`` with parsed ``args``."""
    prepare_kdd12(
        args.input,
        args.output,
        user_profile=args.user_profile,
        expand_impressions=args.expand_impressions,
        seed=args.seed,
        **stream_options(args),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m data_scripts.kdd12 ...``: the same as ``recsys-embed data kdd12 ...``."""
    from data_scripts.cli import main as data_main

    data_main(["kdd12", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

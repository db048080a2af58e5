"""Frappe app-usage CTR data (libFM files of the NFM/AFM release) -> the CTR parquet layout.

Input: libFM text files, one row per line, space-separated::

    label idx:1 idx:1 ... (10 features)
    label: -1 or 1 (0 is read as a negative too); idx: a global feature id, value always 1 (one-hot)

The 10 features of a row are, by position: user, item, daytime, weekday, isweekend, homework, cost, weather,
country, city. Windows line endings (the release has them) are fine.

Command lines::

    recsys-embed data frappe --input frappe.*.libfm --output data/frappe   # seeded random 7:2:1 split of all rows
    recsys-embed data frappe --train frappe.train.libfm --val frappe.validation.libfm \\
        --test frappe.test.libfm --output data/frappe_given               # the files' own split

Output: ``label`` (-1 -> 0, 1 -> 1), no dense features, ``cat_0..cat_9`` = the 10 fields in row order. Each
field's global ids are renumbered to contiguous ids ``0..n-1`` in ascending order of the global id, over the rows
of all input files together (Frappe's vocabulary is closed: the libFM files already number every feature, so
there is no OOV id; an id seen only in val/test keeps an untrained embedding row).

Split: with ``--input`` the split depends only on the rows, not on the order (or names, or grouping) of the input
files: all rows are first put in a canonical order, sorted by their content (label, then the 10 global ids), then
shuffled with ``numpy.random.default_rng(seed).permutation`` and cut 70% / 20% / 10% (rounded cumulative
boundaries) into train / val / test; each split is written in that shuffled order. (Identical rows are
interchangeable, so ``frappe.*.libfm`` in any order gives byte-identical splits.) With ``--train/--val/--test``
each file is its split, in file order.

Malformed rows (not 11 fields, a label other than -1/0/1, a feature that is not ``id:1``) raise ``ValueError``
naming the file and line, unless ``--skip-bad-rows``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_scripts._common import (
    BadRows,
    add_output_arguments,
    atomic_output,
    contiguous_ids,
    ctr_table,
    matches,
    prepare_output,
    read_delimited,
    save_dataset,
    split_sizes,
    validate,
)
from recsys_embed.data.schema import CTRSchema, count_ids, write_split

log = logging.getLogger(__name__)

FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]
COLUMNS = ["label", *FIELDS]
LAYOUT = "label then 10 id:1 features: " + ", ".join(FIELDS)
FRACTIONS = (0.7, 0.2, 0.1)
SPLITS = ("train", "val", "test")


def read_libfm(path: str | Path, bad: BadRows) -> tuple[np.ndarray, np.ndarray]:
    """One Frappe libFM file as ``(labels (R,) float32 0/1, global ids (10, R) int64)``."""
    labels, ids = [], []
    for table, lines in read_delimited(path, COLUMNS, delimiter=b" ", bad=bad, layout=LAYOUT):
        label_ok = pc.is_in(table["label"], value_set=pa.array([b"-1", b"0", b"1", b"+1"], pa.binary()))
        checks = [("label", "-1 or 1", label_ok.to_numpy(zero_copy_only=False))]
        checks += [(f, "a feature id:1", matches(table[f], r"[0-9]{1,18}:1(\.0*)?")) for f in FIELDS]
        table, lines = validate(table, lines, checks, path, bad)
        if not len(lines):
            continue
        labels.append(pc.is_in(table["label"], value_set=pa.array([b"1", b"+1"], pa.binary())).to_numpy())
        ids.append(
            np.stack(
                [
                    pc.list_element(pc.split_pattern(table[f], b":", max_splits=1), 0)
                    .cast(pa.int64())
                    .to_numpy(zero_copy_only=False)
                    for f in FIELDS
                ]
            )
        )
    if not labels:
        raise ValueError(f"{path} has no valid rows.")
    return np.concatenate(labels).astype(np.float32), np.concatenate(ids, axis=1)


def prepare_frappe(
    output: str | Path,
    *,
    inputs: Sequence[str | Path] = (),
    train: str | Path | None = None,
    val: str | Path | None = None,
    test: str | Path | None = None,
    seed: int = 0,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
) -> CTRSchema:
    """Convert Frappe libFM files into a CTR dataset folder.

    Give either ``inputs`` (all rows, seeded random 7:2:1 split, independent of the files' order) or all of
    ``train``, ``val`` and ``test`` (each file is its split). See the module docstring for the id and split rules.
    ``output`` is written atomically (:func:`~data_scripts._output.atomic_output`); an existing non-empty folder
    is refused unless ``overwrite``. Returns the saved schema.
    """
    given = [train, val, test]
    if bool(inputs) == any(p is not None for p in given):
        raise ValueError("Give either input files (--input: seeded random 7:2:1 split) or --train/--val/--test files.")
    if not inputs and any(p is None for p in given):
        raise ValueError("The given-files split needs all of --train, --val and --test.")
    files = [Path(p) for p in inputs] if inputs else [Path(p) for p in given if p is not None]
    with atomic_output(output, overwrite=overwrite, inputs=files) as staging:
        return _write_frappe(files, staging, random_split=bool(inputs), seed=seed, skip_bad_rows=skip_bad_rows)


def _write_frappe(
    files: Sequence[Path], output: Path, *, random_split: bool, seed: int, skip_bad_rows: bool
) -> CTRSchema:
    """Read ``files`` and write the dataset into ``output`` (the staging folder)."""
    bad = BadRows(skip_bad_rows)
    parts = [read_libfm(p, bad) for p in files]
    labels = np.concatenate([lab for lab, _ in parts])
    raw = np.concatenate([ids for _, ids in parts], axis=1)
    total = len(labels)
    if bad.count:
        log.warning("Skipped %d malformed rows.", bad.count)

    ids = np.empty_like(raw)
    cardinalities = []
    for f in range(len(FIELDS)):
        ids[f], vocabulary = contiguous_ids(raw[f])
        cardinalities.append(len(vocabulary))

    if random_split:
        # canonical order: by content (label, then the global ids), so the files' order does not matter
        canonical = np.lexsort([*raw[::-1], labels])
        order = canonical[np.random.default_rng(seed).permutation(total)]
        bounds = np.cumsum([0, *split_sizes(total, FRACTIONS)])
        rows_of = {s: order[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
        split_rule = f"seeded random 7:2:1 of the rows sorted by content, independent of file order (seed {seed})"
    else:
        ends = np.cumsum([0, *(len(lab) for lab, _ in parts)])
        rows_of = {s: np.arange(ends[i], ends[i + 1]) for i, s in enumerate(SPLITS)}
        split_rule = "given files"
    for split, index in rows_of.items():
        if not len(index):
            raise ValueError(f"The {split} split is empty ({total} rows in all); give more rows.")

    folder = prepare_output(output)
    rows = {}
    for split, index in rows_of.items():
        rows[split] = write_split(folder, split, ctr_table(labels[index], np.empty((len(index), 0)), ids[:, index]))
    sparse = [f"cat_{f}" for f in range(len(FIELDS))]
    counts = count_ids(dict(zip(sparse, ids[:, rows_of["train"]])), dict(zip(sparse, cardinalities)))
    log.info("Frappe: %d rows, positive rate %.3f, split %s", total, labels.mean(), rows)
    return save_dataset(
        folder,
        num_dense=0,
        cardinalities=cardinalities,
        rows=rows,
        id_counts=[counts[s] for s in sparse],
        source={
            "dataset": "frappe",
            "script": "data_scripts.frappe",
            "inputs": sorted(p.name for p in files) if random_split else [p.name for p in files],
            "split": split_rule,
            "fields": dict(zip(sparse, FIELDS)),
            "ids": "per field, global libFM ids renumbered in ascending order over all input rows",
            "skipped_rows": bad.count,
        },
    )


SUMMARY = "Frappe app-usage libFM files (NFM/AFM release)"
EXAMPLES = """examples:
  recsys-embed data frappe --input frappe.*.libfm --output data/frappe
  recsys-embed data frappe --train frappe.train.libfm --val frappe.validation.libfm --test frappe.test.libfm \\
      --output data/frappe_given"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``recsys-embed data frappe``."""
    parser.add_argument(
        "--input", type=Path, nargs="+", default=[], help="libFM files: seeded random 7:2:1 split (any order)"
    )
    parser.add_argument("--train", type=Path, help="libFM file of the train split (with --val and --test)")
    parser.add_argument("--val", type=Path, help="libFM file of the val split")
    parser.add_argument("--test", type=Path, help="libFM file of the test split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="drop malformed rows instead of failing")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """Run ``recsys-embed data frappe`` with parsed ``args``."""
    prepare_frappe(
        args.output,
        inputs=args.input,
        train=args.train,
        val=args.val,
        test=args.test,
        seed=args.seed,
        skip_bad_rows=args.skip_bad_rows,
        overwrite=args.overwrite,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m data_scripts.frappe ...``: the same as ``recsys-embed data frappe ...``."""
    from data_scripts.cli import main as data_main

    data_main(["frappe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

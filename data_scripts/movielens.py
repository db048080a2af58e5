"""MovieLens 100K / 1M ratings with user and item side information -> the CTR parquet layout.

Input: the unpacked GroupLens folder, either

* ML-100K (``ml-100k/``): ``u.data`` (``user \\t item \\t rating \\t timestamp``), ``u.user``
  (``id|age|gender|occupation|zip``), ``u.item`` (latin-1, ``id|title|release date|video date|url|`` then 19
  genre flags: unknown, Action, ..., Western); or
* ML-1M (``ml-1m/``): ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), ``users.dat``
  (``UserID::Gender::Age::Occupation::Zip-code``), ``movies.dat`` (latin-1, ``MovieID::Title::Genre|Genre``).

MovieLens 10M/20M/25M have no user side information and are not supported.

Command lines::

    recsys-embed data movielens --input ml-100k --output data/movielens_100k
    recsys-embed data movielens --input ml-1m --output data/movielens_1m --threshold 4 --split random --seed 0

Output: ``label`` = 1 when rating >= ``--threshold`` (default 4), else 0; no dense features; 7 categorical
features, each numbered by contiguous ids in ascending order of the raw value:

* ``cat_0`` user id, ``cat_1`` item id (over all users/items of the side tables, rated or not),
* ``cat_2`` gender, ``cat_3`` age bucket (7 buckets: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+, ML-1M's age
  codes), ``cat_4`` occupation, ``cat_5`` zip-code prefix (the first character, upper-cased: a US region or a
  Canadian/foreign code), both over the values present in the user table,
* ``cat_6`` the item's first genre in the 19-genre list above (ML-100K flag order; ML-1M's genre names map to the
  same list; an item with no genre gets "unknown", id 0),
* ``cat_7`` genres, a list feature (``list<int64>``): all of the item's genres as ids in the same 19-genre list,
  in that list's order (ML-100K's set flags, ML-1M's ``Genre|Genre`` names); an item with none has an empty list.

Split (``--split``): ``time`` (default) sorts ratings by timestamp (ties by user, then item) and takes the
earliest 80% as train, the next 10% as val and the last 10% as test; ``random`` shuffles with
``numpy.random.default_rng(seed)`` and cuts 80/10/10 (rows keep file order within a split). Sizes use rounded
cumulative boundaries, so they add up to the number of ratings.

Malformed lines raise ``ValueError`` naming the file and line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from data_scripts._common import (
    BadRows,
    add_output_arguments,
    atomic_output,
    contiguous_ids,
    ctr_table,
    matches,
    parse_ints,
    prepare_output,
    read_delimited,
    save_dataset,
    split_sizes,
    validate,
)
from recsys_embed.data.schema import CTRSchema, count_ids, write_split

log = logging.getLogger(__name__)

GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
AGE_EDGES = [18, 25, 35, 45, 50, 56]
FEATURES = ["user", "item", "gender", "age_bucket", "occupation", "zip_prefix", "first_genre", "genres"]
FRACTIONS = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")


@dataclass
class Ratings:
    """Ratings as arrays, with each one's line in its file (for error messages)."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    lines: np.ndarray


@dataclass
class Users:
    """The user side table: raw ids and their gender, age in years (or ML-1M age code), occupation, zip."""

    ids: np.ndarray
    gender: np.ndarray
    age: np.ndarray
    occupation: np.ndarray
    zip_code: np.ndarray


@dataclass
class Items:
    """The item side table: raw ids, the index of their first genre in :data:`GENRES`, all genres as flags."""

    ids: np.ndarray
    genre: np.ndarray
    flags: np.ndarray  # (items, len(GENRES)) bool


def genre_lists(flags: np.ndarray) -> pa.ListArray:
    """Each item's genres as a ``list<int64>`` of :data:`GENRES` indices, in that order (empty when none)."""
    offsets = np.zeros(len(flags) + 1, dtype=np.int32)
    np.cumsum(flags.sum(axis=1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.nonzero(flags)[1].astype(np.int64)))


def _fail(path: Path, line: int, problem: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {problem}. Fix or delete that line.")


def _split_lines(path: Path, separator: str, min_fields: int, layout: str) -> list[tuple[int, list[str]]]:
    """Small side tables (a few thousand lines): ``(line number, fields)`` per non-empty line."""
    if not path.is_file():
        raise ValueError(f"{path} is missing; point --input at the unpacked MovieLens folder.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(separator)
        if len(fields) < min_fields:
            raise _fail(path, number, f"has {len(fields)} {separator!r}-separated fields, expected {layout}")
        rows.append((number, fields))
    return rows


def _int(path: Path, line: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _fail(path, line, f"{what} is {text!r}, expected an integer") from None


def read_ratings(path: Path, *, replace: tuple[bytes, bytes] | None = None, layout: str) -> Ratings:
    """``user item rating timestamp`` lines (tab-separated, or ``::`` with ``replace=(b"::", b"\\t")``)."""
    names = ["user", "item", "rating", "timestamp"]
    bad = BadRows(skip=False, skip_flag="")
    parts: list[tuple[np.ndarray, ...]] = []
    for table, lines in read_delimited(path, names, delimiter=b"\t", bad=bad, layout=layout, replace=replace):
        checks = [(n, "a non-negative integer", matches(table[n], r"[0-9]{1,18}")) for n in names]
        table, lines = validate(table, lines, checks, path, bad)
        parts.append((*(parse_ints(table[n]) for n in names), lines))
    if not parts:
        raise ValueError(f"{path} has no ratings.")
    return Ratings(*(np.concatenate(cols) for cols in zip(*parts)))


def read_movielens(folder: str | Path) -> tuple[Ratings, Users, Items, str]:
    """Ratings, user and item tables of an ML-100K or ML-1M folder, and which release it is."""
    folder = Path(folder)
    if (folder / "u.data").is_file():
        ratings = read_ratings(folder / "u.data", layout="user, item, rating, timestamp")
        user_rows = _split_lines(folder / "u.user", "|", 5, "5 (id|age|gender|occupation|zip)")
        item_rows = _split_lines(folder / "u.item", "|", 5 + len(GENRES), "24 (id|title|...|19 genre flags)")
        users = Users(
            ids=np.array([_int(folder / "u.user", n, f[0], "user id") for n, f in user_rows], dtype=np.int64),
            age=np.array([_int(folder / "u.user", n, f[1], "age") for n, f in user_rows], dtype=np.int64),
            gender=np.array([f[2] for _, f in user_rows]),
            occupation=np.array([f[3] for _, f in user_rows]),
            zip_code=np.array([f[4] for _, f in user_rows]),
        )
        flags = []
        for n, f in item_rows:
            row = f[-len(GENRES) :]
            if any(x not in ("0", "1") for x in row):
                raise _fail(folder / "u.item", n, f"the last 19 fields are {row}, expected genre flags 0/1")
            flags.append([x == "1" for x in row])
        flag_array = np.array(flags, dtype=bool).reshape(-1, len(GENRES))
        items = Items(
            ids=np.array([_int(folder / "u.item", n, f[0], "item id") for n, f in item_rows], dtype=np.int64),
            genre=np.where(flag_array.any(axis=1), flag_array.argmax(axis=1), 0).astype(np.int64),
            flags=flag_array,
        )
        return ratings, users, items, "ml-100k"
    if (folder / "ratings.dat").is_file():
        if not (folder / "users.dat").is_file():
            raise ValueError(
                f"{folder} has ratings.dat but no users.dat: MovieLens 10M has no user side information and is "
                "not supported (use ML-100K or ML-1M)."
            )
        ratings = read_ratings(
            folder / "ratings.dat", replace=(b"::", b"\t"), layout="UserID::MovieID::Rating::Timestamp"
        )
        user_rows = _split_lines(folder / "users.dat", "::", 5, "5 (UserID::Gender::Age::Occupation::Zip-code)")
        item_rows = _split_lines(folder / "movies.dat", "::", 3, "3 (MovieID::Title::Genres)")
        users = Users(
            ids=np.array([_int(folder / "users.dat", n, f[0], "UserID") for n, f in user_rows], dtype=np.int64),
            age=np.array([_int(folder / "users.dat", n, f[2], "Age") for n, f in user_rows], dtype=np.int64),
            gender=np.array([f[1] for _, f in user_rows]),
            occupation=np.array([f[3] for _, f in user_rows]),
            zip_code=np.array([f[4] for _, f in user_rows]),
        )
        genres = []
        flags = np.zeros((len(item_rows), len(GENRES)), dtype=bool)
        for row, (n, f) in enumerate(item_rows):
            names = [g for g in f[-1].split("|") if g]
            for name in names:
                if name not in GENRES:
                    raise _fail(folder / "movies.dat", n, f"unknown genre {name!r}, expected one of {GENRES[1:]}")
                flags[row, GENRES.index(name)] = True
            genres.append(GENRES.index(names[0]) if names else 0)
        items = Items(
            ids=np.array([_int(folder / "movies.dat", n, f[0], "MovieID") for n, f in item_rows], dtype=np.int64),
            genre=np.array(genres, dtype=np.int64),
            flags=flags,
        )
        return ratings, users, items, "ml-1m"
    if (folder / "ratings.csv").is_file():
        raise ValueError(
            f"{folder} looks like MovieLens 20M/25M/latest (ratings.csv): these have no user side information and "
            "are not supported (use ML-100K or ML-1M)."
        )
    raise ValueError(f"{folder} holds neither u.data (MovieLens 100K) nor ratings.dat (MovieLens 1M).")


def _lookup(ids: np.ndarray, table_ids: np.ndarray, ratings: Ratings, path: Path, what: str) -> np.ndarray:
    """Index of each raw id in the side table's sorted ids; an id missing there is an error."""
    order = np.argsort(table_ids, kind="stable")
    sorted_ids = table_ids[order]
    if len(np.unique(sorted_ids)) != len(sorted_ids):
        raise ValueError(f"The {what} table of {path.parent} lists an id twice.")
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    missing = np.flatnonzero(sorted_ids[pos] != ids)
    if len(missing):
        i = missing[0]
        raise _fail(path, int(ratings.lines[i]), f"{what} {ids[i]} is not in the {what} table")
    return order[pos]


def prepare_movielens(
    folder: str | Path,
    output: str | Path,
    *,
    threshold: float = 4.0,
    split: Literal["time", "random"] = "time",
    seed: int = 0,
    overwrite: bool = False,
) -> CTRSchema:
    """Convert an ML-100K or ML-1M folder into a CTR dataset folder (rules in the module docstring).

    ``output`` is written atomically (:func:`~data_scripts._output.atomic_output`); an existing non-empty folder
    is refused unless ``overwrite``.
    """
    with atomic_output(output, overwrite=overwrite, inputs=[folder]) as staging:
        return _write_movielens(folder, staging, threshold=threshold, split=split, seed=seed)


def _write_movielens(
    folder: str | Path,
    output: str | Path,
    *,
    threshold: float,
    split: Literal["time", "random"],
    seed: int,
) -> CTRSchema:
    """Read ``folder`` and write the dataset into ``output`` (the staging folder)."""
    if split not in ("time", "random"):
        raise ValueError(f"split must be 'time' or 'random', got {split!r}")
    ratings, users, items, release = read_movielens(folder)
    ratings_file = Path(folder) / ("u.data" if release == "ml-100k" else "ratings.dat")
    user_row = _lookup(ratings.user, users.ids, ratings, ratings_file, "user")
    item_row = _lookup(ratings.item, items.ids, ratings, ratings_file, "item")

    user_id, user_vocab = contiguous_ids(users.ids)
    item_id, item_vocab = contiguous_ids(items.ids)
    gender_id, gender_vocab = contiguous_ids(users.gender)
    occupation_id, occupation_vocab = contiguous_ids(users.occupation)
    zip_id, zip_vocab = contiguous_ids(np.array([z[:1].upper() or "?" for z in users.zip_code]))
    age_bucket = np.searchsorted(AGE_EDGES, users.age, side="right")
    columns = [
        (user_id[user_row], len(user_vocab)),
        (item_id[item_row], len(item_vocab)),
        (gender_id[user_row], len(gender_vocab)),
        (age_bucket[user_row], len(AGE_EDGES) + 1),
        (occupation_id[user_row], len(occupation_vocab)),
        (zip_id[user_row], len(zip_vocab)),
        (items.genre[item_row], len(GENRES)),
    ]
    ids = np.stack([c for c, _ in columns]).astype(np.int64)
    genres = genre_lists(items.flags)  # per item; each rating row takes its item's list
    cardinalities = [n for _, n in columns] + [len(GENRES)]
    labels = (ratings.rating >= threshold).astype(np.float32)

    total = len(labels)
    bounds = np.cumsum([0, *split_sizes(total, FRACTIONS)])
    if split == "time":
        order = np.lexsort((ratings.item, ratings.user, ratings.timestamp))
        rows_of = {s: order[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    else:
        order = np.random.default_rng(seed).permutation(total)
        rows_of = {s: np.sort(order[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}
    for name, index in rows_of.items():
        if not len(index):
            raise ValueError(f"The {name} split is empty ({total} ratings in all).")

    out = prepare_output(output)
    rows = {}
    for name, index in rows_of.items():
        table = ctr_table(labels[index], np.empty((len(index), 0)), ids[:, index])
        table = table.append_column("cat_7", genres.take(pa.array(item_row[index])))
        rows[name] = write_split(out, name, table)
    sparse = [f"cat_{f}" for f in range(len(FEATURES))]
    train = rows_of["train"]
    per_feature = {**dict(zip(sparse, ids[:, train])), "cat_7": genres.take(pa.array(item_row[train]))}
    counts = count_ids(per_feature, dict(zip(sparse, cardinalities)))
    log.info("%s: %d ratings, positive rate %.3f, split %s", release, total, labels.mean(), rows)
    return save_dataset(
        out,
        num_dense=0,
        cardinalities=cardinalities,
        rows=rows,
        id_counts=[counts[s] for s in sparse],
        source={
            "dataset": release,
            "script": "data_scripts.movielens",
            "label": f"rating >= {threshold}",
            "split": "by timestamp 80/10/10" if split == "time" else f"seeded random 80/10/10 (seed {seed})",
            "features": dict(zip(sparse, FEATURES)),
            "vocabularies": {
                "cat_2": gender_vocab.tolist(),
                "cat_3": ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"],
                "cat_4": occupation_vocab.tolist(),
                "cat_5": zip_vocab.tolist(),
                "cat_6": GENRES,
                "cat_7": GENRES,
            },
        },
    )


SUMMARY = "MovieLens 100K or 1M with user and item features"
EXAMPLES = """examples:
  recsys-embed data movielens --input ml-100k --output data/movielens_100k
  recsys-embed data movielens --input ml-1m --output data/movielens_1m --split random --seed 0"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``recsys-embed data movielens``."""
    parser.add_argument("--input", type=Path, required=True, help="unpacked ml-100k or ml-1m folder")
    parser.add_argument("--threshold", type=float, default=4.0, help="label 1 when rating >= this (default 4)")
    parser.add_argument("--split", choices=["time", "random"], default="time", help="80/10/10 split rule")
    parser.add_argument("--seed", type=int, default=0, help="seed of --split random (default 0)")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """Run ``recsys-embed data movielens`` with parsed ``args``."""
    prepare_movielens(
        args.input, args.output, threshold=args.threshold, split=args.split, seed=args.seed, overwrite=args.overwrite
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m data_scripts.movielens ...``: the same as ``recsys-embed data movielens ...``."""
    from data_scripts.cli import main as data_main

    data_main(["movielens", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

"""Implicit-feedback interaction data -> the graph layout of graph collaborative filtering (NGCF, LightGCN, MF-BPR).

Input (``--input FOLDER``, its format found from the files it holds, or named with ``--format``):

* ``lightgcn``: the NGCF/LightGCN split release (Gowalla, Yelp2018, Amazon-book): ``train.txt`` and ``test.txt``,
  one line per user, ``user item item ...`` (space-separated, ids from 0; a user with no items may be a lone id).
  The split is the release's.
* ``lastfm``: Last.fm (HetRec 2011) as shipped with LightGCN-PyTorch: ``data1.txt`` (train) and ``test1.txt``,
  ``user \\t item \\t weight`` (ids from 1; every listed pair is a positive, the weight is not used). The split is
  the release's.
* ``movielens``: MovieLens 100K ``u.data`` (``user \\t item \\t rating \\t timestamp``) or 1M ``ratings.dat``
  (``::``-separated): a rating >= ``--threshold`` (default 4) is a positive; a seeded per-user split puts
  ``floor(n * --test-fraction)`` (default 0.2) of each user's ``n`` positives in test, the rest in train
  (``numpy.random.default_rng(--seed)`` orders each user's positives).

Command lines::

    recsys-embed data graph --input ml-100k --output data/ml100k_graph
    recsys-embed data graph --input lastfm --output data/lastfm_graph
    recsys-embed data graph --input gowalla --output data/gowalla_graph   # train.txt + test.txt

Output: the graph layout (:mod:`recsys_embed.data.graph`): ``train.parquet``/``test.parquet`` with int64 columns
``user`` and ``item`` and ``graph.json`` (``num_users``, ``num_items``, row counts, source). Ids keep the
release's numbering, shifted to start at 0 (MovieLens and LastFM ids start at 1): ``num_users``/``num_items`` are
the largest id over both files plus one, so a user or item without positives stays in the graph (isolated).
Duplicate pairs are kept once, and a test pair that is also a train pair is dropped from test (a ranking excludes
train items). Malformed lines raise ``ValueError`` naming the file and line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_scripts._common import BadRows, add_output_arguments, atomic_output, matches, parse_ints, read_delimited
from data_scripts._common import validate as validate_rows
from data_scripts.movielens import read_ratings

if TYPE_CHECKING:  # the graph class imports torch: loaded only when a graph is built, not for `data --help`
    from recsys_embed.data.graph import InteractionGraph

log = logging.getLogger(__name__)

SUMMARY = "Interaction data (NGCF/LightGCN train.txt/test.txt, LastFM, MovieLens) -> a graph CF dataset folder."
EXAMPLES = """examples:
  recsys-embed data graph --input ml-100k --output data/ml100k_graph
  recsys-embed data graph --input lastfm --output data/lastfm_graph
  recsys-embed data graph --input gowalla --output data/gowalla_graph --format lightgcn"""

#: format -> the files that identify it in --input
FORMAT_FILES = {
    "lightgcn": ("train.txt", "test.txt"),
    "lastfm": ("data1.txt", "test1.txt"),
    "movielens": ("u.data",),
    "movielens-1m": ("ratings.dat",),
}
Pairs = tuple[np.ndarray, np.ndarray]


def detect_format(folder: Path) -> str:
    """The format whose files ``folder`` holds (exactly one must match)."""
    if not folder.is_dir():
        raise ValueError(f"--input {folder} is not a folder; point it at the unpacked dataset folder.")
    found = [name for name, files in FORMAT_FILES.items() if all((folder / f).is_file() for f in files)]
    if len(found) != 1:
        expected = "; ".join(f"{name}: {' + '.join(files)}" for name, files in FORMAT_FILES.items())
        raise ValueError(
            f"--input {folder} holds {'the files of ' + ' and '.join(found) if found else 'none of the known files'}"
            f" ({expected}); pass --format to choose."
        )
    return found[0]


def read_user_lines(path: Path) -> Pairs:
    """``user item item ...`` lines (NGCF/LightGCN ``train.txt``/``test.txt``) as (users, items) pairs."""
    if not path.is_file():
        raise ValueError(f"{path} is missing; the lightgcn format needs train.txt and test.txt.")
    users, items = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            ids = np.array(fields, dtype=np.int64)
        except ValueError:
            raise ValueError(
                f"{path}, line {number}: expected 'user item item ...' as non-negative integers, got "
                f"{line[:60]!r}. Fix or delete that line."
            ) from None
        if ids.min() < 0:
            raise ValueError(f"{path}, line {number}: negative id in {line[:60]!r}. Fix or delete that line.")
        users.append(np.full(len(ids) - 1, ids[0]))
        items.append(ids[1:])
    if not users:
        raise ValueError(f"{path} has no interactions.")
    return np.concatenate(users), np.concatenate(items)


def read_weighted_pairs(path: Path) -> Pairs:
    """``user \\t item \\t weight`` lines (LastFM), ids from 1, as 0-based (users, items)."""
    if not path.is_file():
        raise ValueError(f"{path} is missing; the lastfm format needs data1.txt and test1.txt.")
    names, bad, parts = ["user", "item", "weight"], BadRows(skip=False, skip_flag=""), []
    for table, lines in read_delimited(path, names, delimiter=b"\t", bad=bad, layout="user \\t item \\t weight"):
        checks = [(n, "a positive integer", matches(table[n], r"0*[1-9][0-9]{0,17}")) for n in names[:2]]
        table, lines = validate_rows(table, lines, checks, path, bad)
        parts.append((parse_ints(table["user"]) - 1, parse_ints(table["item"]) - 1))
    if not parts:
        raise ValueError(f"{path} has no interactions.")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def per_user_split(users: np.ndarray, items: np.ndarray, test_fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """``floor(n * test_fraction)`` of each user's ``n`` pairs to test, in a seeded random order per user."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}.")
    key = np.random.default_rng(seed).random(len(users))
    order = np.lexsort((key, users))
    users, items = users[order], items[order]
    counts = np.bincount(users)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(users)) - starts[users]
    test = rank < np.floor(counts[users] * test_fraction)
    return (users[~test], items[~test]), (users[test], items[test])


def unique_pairs(users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    return np.unique(users * num_items + items)


def build_graph(
    train: Pairs, test: Pairs, source: dict[str, object], num_users: int = 0, num_items: int = 0
) -> InteractionGraph:
    """The graph of the two splits: duplicates dropped, test pairs seen in train dropped, ids as given (at least
    ``num_users``/``num_items`` nodes, more if the ids need them)."""
    num_users = max(num_users, int(max(train[0].max(initial=-1), test[0].max(initial=-1))) + 1)
    num_items = max(num_items, int(max(train[1].max(initial=-1), test[1].max(initial=-1))) + 1)
    train_keys = unique_pairs(*train, num_items)
    test_keys = np.setdiff1d(unique_pairs(*test, num_items), train_keys)
    dropped = len(test[0]) - len(test_keys)
    if dropped:
        log.info("Dropped %d test pairs that are duplicates or also train pairs", dropped)
    pairs = {name: (keys // num_items, keys % num_items) for name, keys in (("train", train_keys), ("test", test_keys))}
    from recsys_embed.data.graph import InteractionGraph

    return InteractionGraph(num_users, num_items, pairs, source=source)


def read_graph(folder: Path, fmt: str, *, threshold: int, test_fraction: float, seed: int) -> InteractionGraph:
    """Read ``folder`` in format ``fmt`` (see the module docstring) as an interaction graph."""
    if fmt == "lightgcn":
        train, test = read_user_lines(folder / "train.txt"), read_user_lines(folder / "test.txt")
        return build_graph(train, test, {"format": fmt, "split": "release"})
    if fmt == "lastfm":
        train, test = read_weighted_pairs(folder / "data1.txt"), read_weighted_pairs(folder / "test1.txt")
        return build_graph(train, test, {"format": fmt, "split": "release", "ids": "file ids - 1"})
    if fmt in ("movielens", "movielens-1m"):
        if fmt == "movielens":
            ratings = read_ratings(folder / "u.data", layout="user \\t item \\t rating \\t timestamp")
        else:
            layout = "UserID::MovieID::Rating::Timestamp"
            ratings = read_ratings(folder / "ratings.dat", replace=(b"::", b"\t"), layout=layout)
        keep = ratings.rating >= threshold
        if not keep.any():
            raise ValueError(f"No rating in {folder} is >= --threshold {threshold}; lower the threshold.")
        users, items = ratings.user[keep] - 1, ratings.item[keep] - 1
        train, test = per_user_split(users, items, test_fraction, seed)
        source = {"format": fmt, "threshold": threshold, "test_fraction": test_fraction, "seed": seed}
        # users and items without positives stay in the graph (isolated nodes)
        sizes = {"num_users": int(ratings.user.max()), "num_items": int(ratings.item.max())}
        return build_graph(train, test, source | {"ids": "file ids - 1"}, **sizes)
    raise ValueError(f"Unknown --format {fmt!r}; choose one of {sorted(FORMAT_FILES)}.")


def prepare_graph(
    output: Path,
    *,
    input: Path,
    fmt: str | None = None,
    threshold: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> InteractionGraph:
    """Write the graph-layout folder ``output`` from ``input`` (atomically)."""
    fmt = fmt or detect_format(Path(input))
    with atomic_output(output, overwrite=overwrite, inputs=[input]) as staging:
        graph = read_graph(Path(input), fmt, threshold=threshold, test_fraction=test_fraction, seed=seed)
        graph.save(staging)
    rows = {split: len(users) for split, (users, _) in graph.pairs.items()}
    log.info("Graph: %d users, %d items, rows %s", graph.num_users, graph.num_items, rows)
    return graph


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``recsys-embed data graph``."""
    parser.add_argument("--input", type=Path, required=True, help="the unpacked dataset folder")
    parser.add_argument("--format", choices=sorted(FORMAT_FILES), help="the input's format (default: from its files)")
    parser.add_argument("--threshold", type=int, default=4, help="movielens: rating >= this is a positive (4)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="movielens: per-user test share (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="movielens: seed of the per-user split (0)")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """Run ``recsys-embed data graph`` with parsed ``args``."""
    prepare_graph(
        args.output,
        input=args.input,
        fmt=args.format,
        threshold=args.threshold,
        test_fraction=args.test_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m data_scripts.graph ...``: the same as ``recsys-embed data graph ...``."""
    from data_scripts.cli import main as data_main

    data_main(["graph", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

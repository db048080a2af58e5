"""Generate files in the real raw formats of Criteo, Avazu and KDD Cup 2012 track 2, for tests and measurements.

The rows are random (seeded) but shaped like the real files: the same fields, separators, header and value
syntax, long-tailed (Zipf-like) categorical values so vocabularies, min-count thresholds and OOV ids behave as on
the real data. Generation is vectorized (numpy/pyarrow, no Python loop over rows): a few seconds per million rows.

Command line (the data scripts' throughput and memory in the README were measured on such files)::

    python benchmarks/raw_formats.py criteo --rows 2000000 --output /tmp/criteo_2m.txt
    python benchmarks/raw_formats.py avazu --rows 2000000 --output /tmp/avazu_2m.csv
    python benchmarks/raw_formats.py kdd12 --rows 2000000 --output /tmp/kdd12_2m.txt

Example::

    write_avazu("train.csv", rows=1000, seed=0, days=3)   # header + 1000 rows over 3 days, in time order
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _long_tail(rng: np.random.Generator, rows: int, cardinality: int) -> np.ndarray:
    """Ids in ``[0, cardinality)``, Zipf(1.2)-like: a few frequent, a long tail seen once or twice."""
    return (rng.zipf(1.2, rows) - 1) % cardinality


def _scramble(ids: np.ndarray, salt: int) -> np.ndarray:
    """A fixed 32-bit bijection of ids (so hashed values look random but stay distinct)."""
    x = (ids.astype(np.uint64) + np.uint64(salt)) & np.uint64(0xFFFFFFFF)
    with np.errstate(over="ignore"):
        x = (x * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)
    return x


def _hex8(values: np.ndarray) -> pa.Array:
    """32-bit values as 8-digit lowercase hex strings (binary)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    digits = _HEX_DIGITS[((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(15)).astype(np.int64)]
    return pa.array(np.ascontiguousarray(digits).view("S8").reshape(-1), pa.binary())


def _text(values: np.ndarray) -> pa.Array:
    return pa.array(values).cast(pa.string()).cast(pa.binary())


def _blank(column: pa.Array, empty: np.ndarray) -> pa.Array:
    return pa.array(np.where(empty, b"", column.to_numpy(zero_copy_only=False)), pa.binary())


def _write(path: str | Path, columns: dict[str, pa.Array], delimiter: str, header: bool) -> Path:
    table = pa.table(columns)
    options = pacsv.WriteOptions(include_header=False, delimiter=delimiter, quoting_style="none")
    with pa.OSFile(str(path), "wb") as out:
        if header:  # pyarrow quotes header names whatever the quoting style
            out.write((delimiter.join(columns) + "\n").encode())
        pacsv.write_csv(table, out, write_options=options)
    return Path(path)


def write_criteo(path: str | Path, rows: int, seed: int = 0) -> Path:
    """Criteo TSV: label, I1..I13 (some empty), C1..C26 (8 hex digits, some empty); no header."""
    rng = np.random.default_rng(seed)
    columns = {"label": _text((rng.random(rows) < 0.25).astype(np.int64))}
    for j in range(1, 14):
        ints = _text(rng.geometric(0.05, rows) - 2)  # a few -1
        columns[f"I{j}"] = _blank(ints, rng.random(rows) < 0.2)
    cardinalities = np.geomspace(10, 2_000_000, 26).astype(np.int64)
    for k in range(26):
        values = _hex8(_scramble(_long_tail(rng, rows, int(cardinalities[k])), salt=k))
        columns[f"C{k + 1}"] = _blank(values, rng.random(rows) < 0.1)
    return _write(path, columns, "\t", header=False)


def write_avazu(path: str | Path, rows: int, seed: int = 0, days: int = 10) -> Path:
    """Avazu train CSV with its header: hours from 2014-10-21 00h over ``days`` days, in time order."""
    from data_scripts.avazu import CATEGORICAL, HEX_COLUMNS

    rng = np.random.default_rng(seed)
    hour_index = np.sort(rng.integers(0, 24 * days, rows))
    dates = np.datetime64("2014-10-21") + hour_index // 24
    months = dates.astype("datetime64[M]")
    year = months.astype(np.int64) // 12 + 1970
    yymmddhh = (year % 100) * 1_000_000 + (months.astype(np.int64) % 12 + 1) * 10_000
    yymmddhh += ((dates - months).astype(np.int64) + 1) * 100 + hour_index % 24
    columns = {
        "id": _text(rng.integers(0, 2**63 - 1, rows, dtype=np.int64)),
        "click": _text((rng.random(rows) < 0.17).astype(np.int64)),
        "hour": _text(yymmddhh),
    }
    for k, name in enumerate(CATEGORICAL):
        cardinality = 10 ** (2 + k % 5)
        ids = _long_tail(rng, rows, cardinality)
        if name in HEX_COLUMNS:
            columns[name] = _hex8(_scramble(ids, salt=k))
        else:
            columns[name] = _text(np.where(ids == 0, -1, ids + 1000) if name == "C20" else ids)
    return _write(path, columns, ",", header=True)


def write_kdd12(path: str | Path, rows: int, seed: int = 0) -> Path:
    """KDD Cup 2012 track 2 ``training.txt``: click, impression, then 10 ids (display_url a 64-bit hash)."""
    rng = np.random.default_rng(seed)
    impressions = 1 + rng.poisson(0.6, rows)
    columns = {"click": _text(rng.binomial(impressions, 0.05)), "impression": _text(impressions)}
    url = _long_tail(rng, rows, 30_000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    columns["display_url"] = _text(url)
    sizes = [500_000, 30_000, 3, 3, 1_000_000, 200_000, 500_000, 400_000, 1_000_000]
    for name, size in zip(["ad_id", "advertiser_id", "depth", "position", "query_id"], sizes):
        columns[name] = _text(_long_tail(rng, rows, size) + (1 if size == 3 else 0))
    for name, size in zip(["keyword_id", "title_id", "description_id", "user_id"], sizes[5:]):
        columns[name] = _text(_long_tail(rng, rows, size))
    return _write(path, columns, "\t", header=False)


def write_kdd12_profiles(path: str | Path, users: int, seed: int = 0) -> Path:
    """``userid_profile.txt``: user_id (0..users-1, every other one), gender 0..2, age 0..6."""
    rng = np.random.default_rng(seed)
    ids = np.arange(0, users, 2)
    columns = {
        "user_id": _text(ids),
        "gender": _text(rng.integers(0, 3, len(ids))),
        "age": _text(rng.integers(0, 7, len(ids))),
    }
    return _write(path, columns, "\t", header=False)


WRITERS = {"criteo": write_criteo, "avazu": write_avazu, "kdd12": write_kdd12}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=sorted(WRITERS))
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    WRITERS[args.format](args.output, args.rows, args.seed)


if __name__ == "__main__":
    main()

"""Data-loader throughput: parquet -> (dense, KJT, labels) batches, ours vs a naive pandas conversion.

Runs in one process on the default synthetic Criteo-shaped data (26 categorical + 13 dense columns) and, in the
same run, on the same data plus ``--lists`` multi-hot list columns (``list<int64>``, Poisson(``--list-length``)
ids per row), and prints a markdown table of rows/s. Usage::

    python benchmarks/loader_throughput.py [--rows 1000000] [--batch-size 4096] [--naive-rows 50000] [--lists 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator

import pyarrow.parquet as pq
import torch
from torchrec import JaggedTensor, KeyedJaggedTensor

from recsys_embed.data import CTRSchema, ParquetBatches, SyntheticConfig, synthetic_dataset

log = logging.getLogger(__name__)


def naive_pandas_batches(path: str, schema: CTRSchema, batch_size: int, max_rows: int) -> Iterator[tuple]:
    """The common hand-written loader: pandas per batch, one jagged entry per row and feature."""
    seen = 0
    for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        frame = record_batch.to_pandas()
        dense = torch.tensor(frame[schema.dense].values, dtype=torch.float32)
        jagged = {
            name: JaggedTensor.from_dense([torch.tensor([int(v)]) for v in frame[name]]) for name in schema.sparse
        }
        sparse = KeyedJaggedTensor.from_jt_dict(jagged)
        yield dense, sparse, torch.tensor(frame[schema.label].values, dtype=torch.float32)
        seen += len(frame)
        if seen >= max_rows:
            return


def rows_per_second(batches: Iterator) -> tuple[int, float]:
    start, rows = time.perf_counter(), 0
    for batch in batches:
        rows += len(batch[2]) if isinstance(batch, tuple) else len(batch.labels)
    return rows, rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="train rows of the synthetic data")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--naive-rows", type=int, default=50_000, help="rows the slow baseline reads")
    parser.add_argument("--lists", type=int, default=1, help="multi-hot list columns added for the list figure")
    parser.add_argument("--list-length", type=float, default=5.0, help="mean ids per row of each list column")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    folder = synthetic_dataset(SyntheticConfig(train_rows=args.rows))
    schema = CTRSchema.load(folder)
    path = str(schema.split_path(folder, "train"))
    pq.read_table(path)  # warm the page cache so the first timed loader is not penalised
    results = []
    for label, shuffle in (("recsys_embed ParquetBatches", False), ("recsys_embed ParquetBatches, shuffled", True)):
        rows, speed = rows_per_second(iter(ParquetBatches(path, schema, args.batch_size, shuffle=shuffle)))
        results.append((label, rows, speed))
    if args.lists:
        lists_cfg = SyntheticConfig(
            train_rows=args.rows, num_multi_hot=args.lists, multi_hot_mean_length=args.list_length
        )
        lists_folder = synthetic_dataset(lists_cfg)
        lists_schema = CTRSchema.load(lists_folder)
        lists_path = str(lists_schema.split_path(lists_folder, "train"))
        pq.read_table(lists_path)
        what = f"+ {args.lists} list column(s), mean length {args.list_length:g}"
        for label, shuffle in ((f"ParquetBatches {what}", False), (f"ParquetBatches {what}, shuffled", True)):
            rows, speed = rows_per_second(
                iter(ParquetBatches(lists_path, lists_schema, args.batch_size, shuffle=shuffle))
            )
            results.append((label, rows, speed))
    rows, speed = rows_per_second(naive_pandas_batches(path, schema, args.batch_size, args.naive_rows))
    results.append(("naive pandas per-batch conversion", rows, speed))
    baseline = results[-1][2]
    lines = [
        f"parquet -> KJT batches, batch {args.batch_size}, {len(schema.sparse)} cat + {len(schema.dense)} dense",
        "| loader | rows | rows/s | vs naive |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {label} | {rows:,} | {speed:,.0f} | {speed / baseline:.0f}x |" for label, rows, speed in results]
    log.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()

"""Stream a large delimited text file through pyarrow's CSV streaming reader, with each row's physical line number.

``pyarrow.csv.open_csv`` parses the file block by block (``block_bytes`` of text each) into binary columns, on one
thread: pyarrow knows a malformed row's line number only when it parses serially (with threads ``row.number`` is
None, and the error would lose its line); the numeric work after it is vectorized numpy. Rows with the wrong number
of fields go to its ``invalid_row_handler``, which records their line numbers and lets the reader skip them. A kept
row's line number follows from how many rows were skipped before it (one ``searchsorted`` per block), so error
messages and line-position splits stay exact while memory stays at about 40 blocks (:data:`STREAM_BLOCK_BYTES`),
whatever the file size. Plain and compressed (``.gz``, ``.bz2``, ``.zst``, ``.lz4``) files are read; a progress bar
follows the bytes read from disk.

Example::

    bad = BadRows(skip=True)
    for table, lines in stream_delimited("train.txt", ["label", "x"], delimiter="\\t", bad=bad, layout="label, x"):
        ...  # table: binary columns "label" and "x"; lines: int64 physical line numbers of its rows
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from data_scripts._common import BadRows, add_output_arguments

log = logging.getLogger(__name__)

STREAM_BLOCK_BYTES = 8 << 20
"""Default text block of the streaming scripts. pyarrow's reader queues up to 32 raw blocks ahead of the parser
(its background reader) plus a few parsed ones, so its memory is about 40 blocks: ~320 MB at 8 MB."""

_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}


def _open(path: Path) -> tuple[pa.NativeFile, pa.NativeFile]:
    """``(raw file, text stream)``; the raw file's position drives the progress bar."""
    if not path.is_file():
        raise ValueError(f"Input file {path} does not exist.")
    raw = pa.OSFile(str(path), "rb")
    codec = _CODECS.get(path.suffix)
    return raw, (pa.CompressedInputStream(raw, codec) if codec else raw)


def read_first_line(path: str | Path, limit: int = 1 << 20) -> bytes:
    """The first line of a (possibly compressed) text file, without its line ending."""
    raw, stream = _open(Path(path))
    with raw, stream:
        head = stream.read(limit)
    return head.split(b"\n", 1)[0].rstrip(b"\r")


class _Skipped:
    """The rows the CSV reader rejected (wrong field count), in line order, until they are reported."""

    def __init__(self) -> None:
        self.lines: list[int] = []
        self.fields: list[int] = []
        self.done = 0  # rejected rows already reported (all before the last yielded row)

    def __call__(self, row: pacsv.InvalidRow) -> str:
        if row.number is None:  # pyarrow always numbers rows in the streaming reader; never guess a line
            raise ValueError(f"pyarrow gave no line number for a malformed row: {row.text[:200]!r}")
        self.lines.append(int(row.number))
        self.fields.append(int(row.actual_columns))
        return "skip"

    def line_numbers(self, first_rank: int, count: int, header_lines: int) -> np.ndarray:
        """Physical line numbers of the kept rows of ranks ``first_rank .. first_rank + count - 1`` (0-based)."""
        order = np.argsort(self.lines, kind="stable")
        pending = np.asarray(self.lines, dtype=np.int64)[order]
        # the i-th rejected line (1-based over the whole file) has (line - header_lines - i) kept rows before it
        kept_before = pending - header_lines - (self.done + np.arange(1, len(pending) + 1))
        ranks = np.arange(first_rank, first_rank + count, dtype=np.int64)
        skipped_before = self.done + np.searchsorted(kept_before, ranks, side="right")
        return header_lines + ranks + 1 + skipped_before

    def pop_until(self, last_line: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return ``(lines, field counts)`` of the rejected rows before ``last_line``."""
        lines, fields = np.asarray(self.lines, dtype=np.int64), np.asarray(self.fields, dtype=np.int64)
        order = np.argsort(lines, kind="stable")
        lines, fields = lines[order], fields[order]
        cut = int(np.searchsorted(lines, last_line, side="right"))
        self.lines, self.fields = lines[cut:].tolist(), fields[cut:].tolist()
        self.done += cut
        return lines[:cut], fields[:cut]


def stream_delimited(
    path: str | Path,
    names: Sequence[str],
    *,
    delimiter: str,
    bad: BadRows,
    layout: str,
    block_bytes: int = STREAM_BLOCK_BYTES,
    header_lines: int = 0,
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Stream ``path`` as ``(table, lines)``: binary columns ``names`` and each kept row's physical line number.

    Rows with the wrong number of fields go to ``bad`` (raise, or count and skip) before the block holding them
    is yielded; values are not checked here. A blank line is a row of empty fields (the scripts' value checks
    reject it). ``header_lines`` lines at the top are skipped (the caller checks them). ``layout`` describes a row
    for error messages.
    """
    path = Path(path)
    skipped = _Skipped()
    read = pacsv.ReadOptions(
        column_names=list(names), skip_rows=header_lines, block_size=max(int(block_bytes), 1), use_threads=False
    )
    parse = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char=False,
        double_quote=False,
        escape_char=False,
        newlines_in_values=False,
        ignore_empty_lines=False,
        invalid_row_handler=skipped,
    )
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}, strings_can_be_null=False)
    raw, stream = _open(path)
    total = path.stat().st_size
    rank = 0

    def describe(fields: np.ndarray):
        return lambda i: (
            f"has {fields[i]} field{'s' if fields[i] != 1 else ''} separated by {delimiter!r}, "
            f"expected {len(names)} ({layout})"
        )

    with raw, stream, tqdm(total=total, unit="B", unit_scale=True, desc=f"read {path.name}") as bar:
        try:
            reader = pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
            for batch in reader:
                lines = skipped.line_numbers(rank, batch.num_rows, header_lines)
                rank += batch.num_rows
                last = int(lines[-1]) if len(lines) else np.iinfo(np.int64).max
                rejected, fields = skipped.pop_until(last)
                bad.report(path, rejected, describe(fields))
                bar.update(raw.tell() - bar.n)
                if batch.num_rows:
                    yield pa.Table.from_batches([batch]), lines
        except pa.ArrowInvalid as exc:
            if "straddl" in str(exc):
                raise ValueError(
                    f"{path} has a line longer than the block size ({block_bytes} bytes); raise --block-mb."
                ) from None
            raise ValueError(f"{path}: cannot be read as {layout}: {exc}") from None
        rejected, fields = skipped.pop_until(np.iinfo(np.int64).max)
        bad.report(path, rejected, describe(fields))


def add_stream_arguments(parser: argparse.ArgumentParser, *, min_count: int) -> None:
    """The options the streaming scripts share: ``--min-count``, ``--skip-bad-rows``, ``--block-mb`` and the
    output options."""
    parser.add_argument(
        "--min-count",
        type=int,
        default=min_count,
        help=f"values seen fewer times in train map to OOV id 0 (default {min_count})",
    )
    parser.add_argument("--skip-bad-rows", action="store_true", help="drop malformed rows instead of failing")
    parser.add_argument(
        "--block-mb",
        type=float,
        default=STREAM_BLOCK_BYTES / 2**20,
        help="text per block (default 8; memory is about 40 blocks)",
    )
    add_output_arguments(parser)


def stream_options(args: argparse.Namespace) -> dict[str, object]:
    """The keyword arguments of a ``prepare_*`` function from :func:`add_stream_arguments`' options."""
    return {
        "min_count": args.min_count,
        "skip_bad_rows": args.skip_bad_rows,
        "block_bytes": max(int(args.block_mb * 2**20), 1),
        "overwrite": args.overwrite,
    }

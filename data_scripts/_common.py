"""Helpers shared by the data scripts: block-wise reading of delimited text with line numbers, malformed-row
handling, buffered parquet split writers, the final ``schema.json`` / ``id_counts.npz``, atomic output folders
(:func:`atomic_output`) and the options every script shares.

Text is read in blocks of whole lines. Each block's field counts are checked with vectorized numpy (so every
malformed row is reported with its physical line number), the well-formed lines are parsed by ``pyarrow.csv`` into
binary columns, and each script validates and converts those columns with vectorized ``pyarrow.compute``/numpy.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from data_scripts._output import OVERWRITE_FLAG, atomic_output, check_output  # noqa: F401 - the scripts' API
from recsys_embed.data.schema import ROW_GROUP_ROWS, SCHEMA_FILE, CTRSchema, save_id_counts

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 64 << 20
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")


class BadRows:
    """What to do with malformed rows: raise a ``ValueError`` naming the file and line, or count and skip them.

    Args:
        skip: drop malformed rows (counted, the first ``log_limit`` logged) instead of raising.
        skip_flag: the command-line option that turns skipping on, named in the error's advice ("" when the
            script has none).
        quiet: count skipped rows without logging them (for a second pass over rows already reported).
    """

    def __init__(
        self, skip: bool = False, skip_flag: str = "--skip-bad-rows", quiet: bool = False, log_limit: int = 10
    ):
        self.skip, self.skip_flag, self.quiet, self.log_limit = skip, skip_flag, quiet, log_limit
        self.count = 0

    def report(self, path: str | Path, lines: np.ndarray, describe: Callable[[int], str]) -> None:
        """Handle the malformed rows at physical ``lines`` of ``path``; ``describe(i)`` explains the i-th one."""
        if len(lines) == 0:
            return
        if not self.skip:
            advice = "Fix or delete that line"
            advice += f", or rerun with {self.skip_flag} to drop malformed rows." if self.skip_flag else "."
            raise ValueError(f"{path}, line {int(lines[0])}: {describe(0)}. {advice}")
        if not self.quiet:
            for i in range(min(len(lines), max(self.log_limit - self.count, 0))):
                log.warning("Skipping %s, line %d: %s", path, int(lines[i]), describe(i))
        self.count += len(lines)


def is_compressed(path: str | Path) -> bool:
    return str(path).endswith(COMPRESSED_SUFFIXES)


def _open(path: str | Path) -> pa.NativeFile:
    if not Path(path).is_file():
        raise ValueError(f"Input file {path} does not exist.")
    return pa.input_stream(str(path), compression="detect")


def _size(path: str | Path) -> int | None:
    """Bytes the reader will see (unknown for compressed files)."""
    return None if is_compressed(path) else Path(path).stat().st_size


def count_lines(path: str | Path, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Physical lines in a (possibly compressed) text file; a last line without a newline counts too."""
    lines, last = 0, b"\n"
    with (
        _open(path) as stream,
        tqdm(total=_size(path), unit="B", unit_scale=True, desc=f"count {Path(path).name}") as bar,
    ):
        while data := stream.read(block_bytes):
            lines += data.count(b"\n")
            last = data[-1:]
            bar.update(len(data))
    return lines + (last != b"\n")


def iter_line_blocks(path: str | Path, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """``(first line number, block)`` for blocks of whole lines, each ending with ``\\n`` (1-based numbers)."""
    first, carry = 1, b""
    with (
        _open(path) as stream,
        tqdm(total=_size(path), unit="B", unit_scale=True, desc=f"read {Path(path).name}") as bar,
    ):
        while True:
            data = stream.read(block_bytes)
            bar.update(len(data))
            if not data:
                if carry:
                    yield first, carry + b"\n"
                return
            buf = carry + data
            cut = buf.rfind(b"\n") + 1
            if cut == 0:  # a line longer than the block: keep reading
                carry = buf
                continue
            block, carry = buf[:cut], buf[cut:]
            yield first, block
            first += block.count(b"\n")


def read_delimited(
    path: str | Path,
    names: Sequence[str],
    *,
    delimiter: bytes,
    bad: BadRows,
    layout: str,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    replace: tuple[bytes, bytes] | None = None,
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Stream a delimited text file as ``(table, lines)``: binary columns ``names`` and each row's line number.

    Lines with the wrong number of fields (blank lines included) go to ``bad``; values are not checked here.
    ``replace`` rewrites a multi-byte separator (``b"::"``) to ``delimiter`` first; ``layout`` describes a row
    for error messages.
    """
    if len(delimiter) != 1:
        raise ValueError(f"delimiter must be one byte, got {delimiter!r}")
    parse = pacsv.ParseOptions(
        delimiter=delimiter.decode(),
        quote_char=False,
        double_quote=False,
        escape_char=False,
        newlines_in_values=False,
        ignore_empty_lines=False,
    )
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}, strings_can_be_null=False)
    sep = delimiter[0]
    for first, block in iter_line_blocks(path, block_bytes):
        if replace is not None:
            block = block.replace(*replace)
        raw = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(raw == 10)
        seps = np.flatnonzero(raw == sep)
        fields = np.diff(np.searchsorted(seps, ends), prepend=0) + 1
        wrong = np.flatnonzero(fields != len(names))
        if len(wrong):
            bad.report(
                path,
                first + wrong,
                lambda i, wrong=wrong, fields=fields: (
                    f"has {fields[wrong[i]]} field{'s' if fields[wrong[i]] != 1 else ''} separated by "
                    f"{delimiter.decode()!r}, expected {len(names)} ({layout})"
                ),
            )
            starts = np.concatenate([[0], ends[:-1] + 1])
            keep = np.ones(len(ends), dtype=bool)
            keep[wrong] = False
            # copy the runs of good lines between the bad ones
            edges = np.flatnonzero(np.diff(np.concatenate([[False], keep, [False]]).astype(np.int8)))
            block = b"".join(block[starts[a] : ends[b - 1] + 1] for a, b in zip(edges[0::2], edges[1::2]))
            lines = first + np.flatnonzero(keep)
        else:
            lines = first + np.arange(len(ends))
        if not len(lines):
            continue
        read = pacsv.ReadOptions(column_names=list(names))
        table = pacsv.read_csv(pa.py_buffer(block), read_options=read, parse_options=parse, convert_options=convert)
        if table.num_rows != len(lines):
            raise ValueError(
                f"{path}, lines {int(lines[0])}-{int(lines[-1])}: parsed {table.num_rows} rows from {len(lines)} "
                "lines; the file has stray carriage returns (\\r) inside lines. Convert it to \\n line endings."
            )
        yield table, lines.astype(np.int64)


def matches(column: pa.ChunkedArray | pa.Array, pattern: str) -> np.ndarray:
    """Boolean numpy mask: which values of a binary/string column fully match the regex ``pattern``."""
    return pc.match_substring_regex(column, f"^(?:{pattern})$").to_numpy(zero_copy_only=False)


def first_failure(
    table: pa.Table, checks: Sequence[tuple[str, str, np.ndarray]], row: int, names: dict[str, str] | None = None
) -> str:
    """Describe why ``row`` failed: the first ``(column, expectation, ok_mask)`` check that is false there."""
    for column, expected, ok in checks:
        if not ok[row]:
            value = table.column(column)[row].as_py()
            shown = value.decode("latin-1") if isinstance(value, bytes) else value
            return f"{(names or {}).get(column, column)} is {shown!r}, expected {expected}"
    return "malformed row"


def validate(
    table: pa.Table,
    lines: np.ndarray,
    checks: Sequence[tuple[str, str, np.ndarray]],
    path: str | Path,
    bad: BadRows,
    names: dict[str, str] | None = None,
) -> tuple[pa.Table, np.ndarray]:
    """Drop (or raise on, per ``bad``) rows failing any ``(column, expectation, ok_mask)`` check."""
    ok = np.logical_and.reduce([mask for _, _, mask in checks]) if checks else np.ones(len(lines), dtype=bool)
    if ok.all():
        return table, lines
    failed = np.flatnonzero(~ok)
    bad.report(path, lines[failed], lambda i: first_failure(table, checks, failed[i], names))
    return table.filter(pa.array(ok)), lines[ok]


def parse_ints(column: pa.ChunkedArray | pa.Array, empty: int = 0) -> np.ndarray:
    """Validated decimal integers (binary column) as int64; empty strings become ``empty``."""
    blank = pc.equal(pc.binary_length(column), 0)
    filled = pc.if_else(blank, pa.scalar(str(empty).encode(), pa.binary()), column)
    return filled.cast(pa.int64()).to_numpy(zero_copy_only=False)


class SplitWriter:
    """Write one split to ``folder/{split}.parquet`` incrementally, in row groups of exactly ``ROW_GROUP_ROWS``."""

    def __init__(self, folder: str | Path, split: str, schema: pa.Schema) -> None:
        self.path = Path(folder) / f"{split}.parquet"
        self.writer = pq.ParquetWriter(self.path, schema)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending).combine_chunks()
        cut = table.num_rows if final else table.num_rows - table.num_rows % ROW_GROUP_ROWS
        if cut:
            self.writer.write_table(table.slice(0, cut), row_group_size=ROW_GROUP_ROWS)
            self.rows += cut
        rest = table.slice(cut)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def close(self) -> int:
        """Write what is left and close the file; return the rows written."""
        self._flush(final=True)
        self.writer.close()
        return self.rows


def ctr_table(labels: np.ndarray, dense: np.ndarray, ids: np.ndarray) -> pa.Table:
    """The CTR columns: ``label`` float32, ``int_j`` from ``dense (R, D)`` float32, ``cat_f`` from ``ids (F, R)``."""
    columns: dict[str, np.ndarray] = {"label": np.asarray(labels, dtype=np.float32)}
    columns.update({f"int_{j}": np.ascontiguousarray(dense[:, j], dtype=np.float32) for j in range(dense.shape[1])})
    columns.update({f"cat_{f}": np.ascontiguousarray(ids[f], dtype=np.int64) for f in range(ids.shape[0])})
    return pa.table(columns)


def ctr_arrow_schema(num_dense: int, num_sparse: int) -> pa.Schema:
    fields = [pa.field("label", pa.float32())]
    fields += [pa.field(f"int_{j}", pa.float32()) for j in range(num_dense)]
    fields += [pa.field(f"cat_{f}", pa.int64()) for f in range(num_sparse)]
    return pa.schema(fields)


def prepare_output(folder: str | Path) -> Path:
    """Create the (staging) output folder; drop a stale ``schema.json`` so a partial folder is never loadable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCHEMA_FILE).unlink(missing_ok=True)
    return folder


def save_dataset(
    folder: str | Path,
    *,
    num_dense: int,
    cardinalities: Sequence[int],
    rows: dict[str, int],
    id_counts: Sequence[np.ndarray],
    source: dict[str, object],
) -> CTRSchema:
    """Write ``id_counts.npz`` and then ``schema.json`` (last, so its presence means the folder is complete)."""
    sparse = [f"cat_{f}" for f in range(len(cardinalities))]
    cards = {name: int(n) for name, n in zip(sparse, cardinalities)}
    for name, counts in zip(sparse, id_counts):
        if len(counts) != cards[name]:
            raise AssertionError(f"{name}: {len(counts)} id counts for cardinality {cards[name]}")
    schema = CTRSchema(
        dense=[f"int_{j}" for j in range(num_dense)],
        sparse=sparse,
        cardinalities=cards,
        splits={split: f"{split}.parquet" for split in rows},
        rows={split: int(n) for split, n in rows.items()},
        source=source,
    )
    save_id_counts(folder, dict(zip(sparse, (np.asarray(c, dtype=np.int64) for c in id_counts))))
    schema.save(folder)
    log.info("Dataset: rows %s, cardinalities %s", schema.rows, list(cards.values()))
    return schema


def contiguous_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vocabulary)``: each value's index in the sorted distinct values."""
    vocabulary, ids = np.unique(values, return_inverse=True)
    return ids.reshape(-1).astype(np.int64), vocabulary


def split_sizes(total: int, fractions: Sequence[float]) -> list[int]:
    """Split ``total`` rows by ``fractions`` (rounded cumulative boundaries, so the sizes add up to ``total``)."""
    bounds = np.round(np.cumsum([0.0, *fractions]) / sum(fractions) * total).astype(np.int64)
    return np.diff(bounds).tolist()


def natural_key(path: str | Path) -> tuple[tuple[tuple[int, int, str], ...], str]:
    """Sort key of a file name with its numbers compared as numbers (``day_2`` before ``day_10``), then the path."""
    chunks = re.split(r"(\d+)", Path(path).name)
    return tuple((0, int(c), "") if c.isdigit() else (1, 0, c) for c in chunks if c), str(path)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every data script shares: ``--output``, ``--overwrite`` and ``--verbose``."""
    parser.add_argument("--output", type=Path, required=True, help="dataset folder to write (written atomically)")
    parser.add_argument(
        OVERWRITE_FLAG,
        action="store_true",
        help="replace the output folder if it exists and is not empty (without it such a folder is refused)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr. ``force``: importing torchrec (via ``recsys_embed``) already installs a root handler."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )

"""Vectorized pieces of the streaming CTR scripts (Criteo, Avazu, KDD12): parse a block's text columns into integer
keys with a per-row validity mask, count keys across blocks, map them to contiguous ids, and a seeded random split.

A categorical value is turned into a 64-bit integer key (hex strings: their value; decimal strings: their value),
so a vocabulary is two sorted numpy arrays (keys and counts, 16 bytes per distinct value) and encoding a block is
one ``searchsorted`` per column: no Python object per row or per value.

Example::

    counter = ValueCounter()
    counter.add(np.array([7, 3, 7]))
    vocabulary = counter.kept(min_count=2)                # array([7])
    map_values(np.array([7, 3]), vocabulary, first_id=1)  # array([1, 0]): 3 is out of vocabulary (id 0)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_scripts._common import BadRows, SplitWriter, ctr_table, matches

log = logging.getLogger(__name__)

OOV_ID = 0
MERGE_AT = 1 << 20
"""A :class:`ValueCounter` merges its pending blocks once they hold this many keys (or as many as it has)."""

_HEX = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
    _HEX[bytes([_c]).upper()[0]] = _i
_NIBBLE = np.where(_HEX >= 0, _HEX, 16).astype(np.uint8)  # 16: not a hex digit
_UINT64_MAX = b"18446744073709551615"


def _binary_parts(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A binary column's ``(offsets (R + 1,) int64, data uint8)`` without copying the bytes."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.type != pa.binary():
        column = column.cast(pa.binary())
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
    data = column.buffers()[2]
    return offsets.astype(np.int64), np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)


def parse_hex(column: pa.Array | pa.ChunkedArray, max_digits: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hex strings of up to ``max_digits`` (<= 15) digits as ``(values int64, ok, empty)`` masks per row.

    ``values`` is the number (0 where the row is empty or not ok); case does not matter. One gather of the
    ``(rows, max_digits)`` last characters of every value, read right to left.
    """
    offsets, data = _binary_parts(column)
    lengths = np.diff(offsets)
    empty = lengths == 0
    if not len(data):
        return np.zeros(len(lengths), np.int64), empty, empty
    if max_digits == 8 and np.all(empty | (lengths == 8)):  # hashed values: 8 digits each, packed back to back
        nibbles = _NIBBLE[data[offsets[0] : offsets[-1]].reshape(-1, 8)]
        values = np.zeros(len(lengths), dtype=np.int64)
        packed = np.ascontiguousarray((nibbles[:, 0::2] << 4) | (nibbles[:, 1::2] & 15))
        values[~empty] = packed.view(">u4").reshape(-1)
        ok = np.ones(len(lengths), dtype=bool)
        ok[~empty] = nibbles.max(axis=1) < 16
        values[~ok] = 0
        return values, ok, empty
    place = np.arange(max_digits)
    present = place[None, :] < lengths[:, None]
    index = np.where(present, offsets[1:, None] - 1 - place[None, :], 0)
    digits = np.where(present, _HEX[data[index]], 0)
    ok = (lengths <= max_digits) & (digits >= 0).all(axis=1)
    values = np.where(ok, (digits << (4 * place)).sum(axis=1), 0)
    return values, ok, empty


def parse_decimal(
    column: pa.Array | pa.ChunkedArray, *, unsigned: bool = False, empty: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decimal integers as ``(values, ok)``: int64 (``-?[0-9]{1,18}``) or uint64 (up to 2**64 - 1).

    ``empty``: the value of an empty field (``None``: an empty field is not ok). Bad rows get 0. The fast path is
    pyarrow's cast, taken only where it accepts exactly what the regex does (no ``x``, which it would read as a hex
    prefix; no longer values, so leading zeros count); any other block is checked row by row with the regex, so
    which rows are ok never depends on the block.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = pa.uint64() if unsigned else pa.int64()
    if empty is not None:
        blank = pc.equal(pc.binary_length(column), 0)
        column = pc.if_else(blank, pa.scalar(str(empty).encode(), pa.binary()), column)
    offsets, data = _binary_parts(column)
    short = not len(column) or int(np.diff(offsets).max()) <= (20 if unsigned else 18)
    if short and not np.any((data == ord("x")) | (data == ord("X"))):
        try:
            return column.cast(kind).to_numpy(zero_copy_only=False), np.ones(len(column), dtype=bool)
        except pa.ArrowInvalid:
            pass
    if unsigned:
        lengths = pc.binary_length(column).to_numpy(zero_copy_only=False)
        small = pc.less_equal(column, pa.scalar(_UINT64_MAX, pa.binary())).to_numpy(zero_copy_only=False)
        ok = matches(column, "[0-9]{1,20}") & ((lengths < 20) | small)
    else:
        ok = matches(column, "-?[0-9]{1,18}")
    filled = pc.if_else(pa.array(ok), column, pa.scalar(b"0", pa.binary()))
    return filled.cast(kind).to_numpy(zero_copy_only=False), ok


class ValueCounter:
    """Occurrence counts of integer keys over many blocks, merged lazily (amortized sort-based merging).

    Memory: 16 bytes per distinct key, plus the pending blocks' distinct keys (16 bytes each) until the next merge,
    at most ``max(distinct keys, merge_at)`` of them: below 48 bytes per distinct key, whatever the rows.
    """

    def __init__(self, merge_at: int | None = None) -> None:
        self.values: np.ndarray | None = None
        self.counts = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0
        self._merge_at = MERGE_AT if merge_at is None else merge_at

    def add(self, values: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Count ``values`` (each once, or ``weights`` times)."""
        if not len(values):
            return
        if weights is None:
            distinct, counts = np.unique(values, return_counts=True)
        else:
            distinct, inverse = np.unique(values, return_inverse=True)
            counts = np.bincount(inverse.reshape(-1), weights=weights, minlength=len(distinct)).astype(np.int64)
        self.add_counts(distinct, counts)

    def add_counts(self, distinct: np.ndarray, counts: np.ndarray) -> None:
        """Add already counted keys (e.g. another counter's ``values``/``counts``)."""
        if not len(distinct):
            return
        self._pending.append((distinct, counts))
        self._pending_size += len(distinct)
        if self._pending_size >= max(len(self.counts), self._merge_at):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        current = [] if self.values is None else [self.values]
        values = np.concatenate([*current, *(v for v, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        self.values, inverse = np.unique(values, return_inverse=True)
        # float64 weights are exact for counts below 2**53
        self.counts = np.bincount(inverse.reshape(-1), weights=counts, minlength=len(self.values)).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted distinct keys, their counts)``."""
        self._merge()
        return (np.empty(0, np.int64) if self.values is None else self.values), self.counts

    def kept(self, min_count: int) -> np.ndarray:
        """Sorted keys seen at least ``min_count`` times."""
        values, counts = self.merged()
        return values[counts >= min_count]


def map_values(
    values: np.ndarray, vocabulary: np.ndarray, first_id: int, missing: np.ndarray | None = None, missing_id: int = 1
) -> np.ndarray:
    """Keys -> ids: ``first_id + index`` in the sorted ``vocabulary``, else :data:`OOV_ID`; rows where the
    boolean ``missing`` is set get ``missing_id``."""
    pos = np.searchsorted(vocabulary, values)
    if len(vocabulary):
        hit = vocabulary[np.minimum(pos, len(vocabulary) - 1)] == values
    else:
        hit = np.zeros(len(values), dtype=bool)
    ids = np.where(hit, pos + first_id, OOV_ID).astype(np.int64)
    if missing is not None:
        ids[missing] = missing_id
    return ids


def random_split_codes(lines: np.ndarray, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """Split code per row (0 train, 1 val, 2 test) from a seeded hash of its line number.

    Each line draws ``u = splitmix64(line + seed * 2**32) / 2**64``, uniform in [0, 1), and goes to the first split
    whose cumulative fraction exceeds ``u``. The code of a row depends only on its line number and the seed (not
    on the block it was read in, nor on other rows), so a streaming pass needs no permutation of all rows; the
    split sizes are the fractions in expectation (binomial, +-0.03% of the rows at 10M rows).
    """
    with np.errstate(over="ignore"):
        z = lines.astype(np.uint64) + np.uint64(seed) * np.uint64(1 << 32) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    bounds = np.cumsum(fractions)[:-1] / np.sum(fractions)
    return np.searchsorted(bounds, u, side="right").astype(np.int8)


def write_split_rows(
    writers: dict[str, SplitWriter],
    id_counts: Sequence[np.ndarray],
    codes: np.ndarray,
    labels: np.ndarray,
    dense: np.ndarray,
    ids: np.ndarray,
) -> None:
    """Append a block's rows to the split writers by ``codes`` (index into ``writers``' order); count the train
    rows' ids (``ids`` is ``(F, R)``) into ``id_counts``."""
    for code, (split, writer) in enumerate(writers.items()):
        mask = codes == code
        if not mask.any():
            continue
        writer.write(ctr_table(labels[mask], dense[mask], ids[:, mask]))
        if split == "train":
            for f, counts in enumerate(id_counts):
                counts += np.bincount(ids[f, mask], minlength=len(counts))


def check_splits(rows: dict[str, int], bad: BadRows) -> None:
    """Log the skipped rows; refuse an empty split (``rows``: rows written per split)."""
    if bad.count:
        log.warning("Skipped %d malformed rows in total.", bad.count)
    for split, n in rows.items():
        if n == 0:
            raise ValueError(
                f"The {split} split is empty: the input has too few rows for it, or every one of its rows was "
                "malformed and skipped."
            )

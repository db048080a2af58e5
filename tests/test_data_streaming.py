"""The streaming layer of the large-data scripts: exact line numbers through pyarrow's streaming CSV reader (bad
rows anywhere, a header, any block size, compressed input), Criteo's output independent of the block size, and
bounded memory: the same rows repeated four times need no more working memory than once."""

from __future__ import annotations

import gzip
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_scripts._common
import data_scripts._vocab
from benchmarks.raw_formats import write_avazu, write_criteo, write_kdd12
from data_scripts import avazu, criteo, kdd12
from data_scripts._common import BadRows
from data_scripts._stream import stream_delimited

SPLITS = ("train", "val", "test")


def _numbered_file(path: Path, rows: int, seed: int) -> tuple[Path, set[int]]:
    """A header, then ``rows`` lines ``n<TAB>n*n`` (n = line number), about 3% with a wrong field count."""
    rng = np.random.default_rng(seed)
    lines, bad = ["a\tb\n"], set()
    for line in range(2, rows + 2):
        if rng.random() < 0.03:
            bad.add(line)
            lines.append(rng.choice(["x\n", "1\t2\t3\n", "\t\t\t\t\n"]))
        else:
            lines.append(f"{line}\t{line * line}\n")
    text = "".join(lines)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path, bad


@pytest.mark.parametrize("name, block", [("t.tsv", 20), ("t.tsv", 997), ("t.tsv", 1 << 20), ("t.tsv.gz", 333)])
def test_stream_delimited_line_numbers(tmp_path: Path, name: str, block: int) -> None:
    source, bad_lines = _numbered_file(tmp_path / name, rows=3000, seed=len(name) + block)
    bad = BadRows(skip=True, quiet=True)
    got = list(stream_delimited(source, ["a", "b"], delimiter="\t", bad=bad, layout="a, b", block_bytes=block,
                                header_lines=1))  # fmt: skip
    lines = np.concatenate([lines for _, lines in got])
    first = np.concatenate([t["a"].to_numpy(zero_copy_only=False) for t, _ in got]).astype(np.int64)
    assert bad.count == len(bad_lines)
    np.testing.assert_array_equal(lines, sorted(set(range(2, 3002)) - bad_lines))
    np.testing.assert_array_equal(first, lines)  # each row's own text says its line


def test_stream_delimited_raises_on_the_first_bad_line(tmp_path: Path) -> None:
    source, bad_lines = _numbered_file(tmp_path / "t.tsv", rows=500, seed=3)
    with pytest.raises(ValueError, match=rf"t.tsv, line {min(bad_lines)}: has \d fields? separated by '\\t', "):
        for _ in stream_delimited(source, ["a", "b"], delimiter="\t", bad=BadRows(), layout="a, b", block_bytes=64,
                                  header_lines=1):  # fmt: skip
            pass
    long_line = tmp_path / "long.tsv"
    long_line.write_text("1\t" + "9" * 500 + "\n")
    with pytest.raises(ValueError, match="line longer than the block size"):
        list(stream_delimited(long_line, ["a", "b"], delimiter="\t", bad=BadRows(), layout="a, b", block_bytes=100))


def test_criteo_block_size_does_not_change_the_output(tmp_path: Path) -> None:
    source = write_criteo(tmp_path / "train.txt", rows=1400, seed=4)
    for name, block in [("small", 900), ("large", 1 << 20)]:  # 900 bytes: three or four lines a block
        criteo.prepare_criteo([source], tmp_path / name, min_count=2, block_bytes=block)
    for split in SPLITS:
        assert pq.read_table(tmp_path / "small" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "large" / f"{split}.parquet")
        )


def test_avazu_reads_gzip(tmp_path: Path) -> None:
    plain = write_avazu(tmp_path / "train.csv", rows=800, seed=5, days=2)
    packed = tmp_path / "train.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    avazu.prepare_avazu(plain, tmp_path / "plain", min_count=1)
    avazu.prepare_avazu(packed, tmp_path / "packed", min_count=1)
    for split in SPLITS:
        assert pq.read_table(tmp_path / "plain" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "packed" / f"{split}.parquet")
        )


def _working_memory(run: Callable[[], object]) -> int:
    """Peak bytes of numpy/Python (tracemalloc) plus pyarrow's allocations (a fresh proxy pool) during ``run``."""
    pool = pa.proxy_memory_pool(pa.system_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1] + pool.max_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)


# blocks small enough that the 4x file is over 100 blocks (past pyarrow's read-ahead)
SCRIPTS = {
    "criteo": (write_criteo, lambda src, out: criteo.prepare_criteo([src], out, min_count=2, block_bytes=16 << 10)),
    "avazu": (
        lambda path, rows, seed: write_avazu(path, rows, seed, days=1),
        lambda src, out: avazu.prepare_avazu(src, out, split="random", block_bytes=8 << 10),
    ),
    "kdd12": (write_kdd12, lambda src, out: kdd12.prepare_kdd12(src, out, min_count=2, block_bytes=4 << 10)),
}


@pytest.mark.parametrize("script", [pytest.param("criteo", marks=pytest.mark.slow), "avazu", "kdd12"])
def test_memory_does_not_grow_with_the_rows(tmp_path: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rows 4 and 16 times: the vocabularies are the same, so any growth of the working memory would be
    rows held in memory. The buffers whose caps are constants (a parquet row group per split, the counters'
    pending keys, pyarrow's ~40 blocks read ahead) are made small, so that the smaller file already fills them:
    their caps hold at any size. (Criteo is the slowest of the three here: in the slow suite.)"""
    monkeypatch.setattr(data_scripts._common, "ROW_GROUP_ROWS", 256)
    monkeypatch.setattr(data_scripts._vocab, "MERGE_AT", 256)
    write, prepare = SCRIPTS[script]
    base = write(tmp_path / "base", 1500, 0).read_bytes()
    header, body = base.split(b"\n", 1) if script == "avazu" else (b"", base)
    files = {}
    for times in (4, 16):
        files[times] = tmp_path / f"x{times}"
        files[times].write_bytes((header + b"\n" if header else b"") + body * times)
    small = _working_memory(lambda: prepare(files[4], tmp_path / "out_4"))
    large = _working_memory(lambda: prepare(files[16], tmp_path / "out_16"))
    extra_input = files[16].stat().st_size - files[4].stat().st_size
    # rows kept in memory would cost at least their text (binary columns hold every byte): growth >= extra_input;
    # what is left is the timing of pyarrow's read-ahead threads
    assert large - small < 0.2 * extra_input, (small, large, extra_input)


@pytest.mark.parametrize("script", ["avazu", "kdd12"])
def test_the_output_trains_with_fit(tmp_path: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``recsys-embed fit`` (the Frappe DCN settings: no dense features) runs a few steps and a test pass on the
    folder a new script wrote."""
    import csv

    from recsys_embed.cli import main as cli_main

    if script == "avazu":
        avazu.prepare_avazu(write_avazu(tmp_path / "train.csv", 4000, seed=1, days=3), tmp_path / "data")
    else:
        kdd12.prepare_kdd12(write_kdd12(tmp_path / "training.txt", 4000, seed=1), tmp_path / "data", min_count=2)
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "experiments" / "ctr" / "frappe_dcn.yaml")
    args = ["fit", "--config", config, "--data.data_dir=data", "--data.batch_size=256", "--trainer.max_steps=6"]
    args += ["--trainer.val_check_interval=3"]
    args += ["--trainer.enable_progress_bar=false", "--test_after_fit=true"]
    assert cli_main(args) is None
    (metrics,) = tmp_path.glob("runs/frappe_dcn/lightning_logs/*/metrics.csv")
    assert any(row.get("test/auc") for row in csv.DictReader(metrics.open()))

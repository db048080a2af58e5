"""Data scripts (``data_scripts.criteo/frappe/movielens``): real sample rows from ``../shared/data`` (skipped when
absent) checked against naive reference parsers, plus tiny hand-written files for exact OOV, split and
malformed-row behaviour. Everything is written to ``tmp_path``; no shared data is copied into the repository."""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_scripts import criteo, frappe, movielens
from data_scripts._common import BadRows, SplitWriter, ctr_arrow_schema, ctr_table, read_delimited, split_sizes
from recsys_embed.data import CTRDataModule, CTRSchema, load_id_counts
from recsys_embed.data.schema import ROW_GROUP_ROWS, flat_ids, is_list_type

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPLITS = ("train", "val", "test")


def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real sample data lives in ../shared/data beside the repository")
    return path


def _load(folder: Path) -> tuple[CTRSchema, dict[str, dict[str, np.ndarray]]]:
    """Every column as a numpy array; a list column flattened to its ids (row lists under ``name + ':lists'``)."""
    schema = CTRSchema.load(folder)
    tables: dict[str, dict[str, np.ndarray]] = {}
    for split in schema.splits:
        table = pq.read_table(schema.split_path(folder, split))
        tables[split] = {name: table.column(name).to_numpy() for name in table.column_names}
        for name in table.column_names:
            if is_list_type(table.schema.field(name).type):
                tables[split][name] = flat_ids(name, table.column(name))
                tables[split][f"{name}:lists"] = np.array(table.column(name).to_pylist(), dtype=object)
    return schema, tables


def _check_ids_and_counts(folder: Path, min_count: int = 1) -> CTRSchema:
    """Ids lie in [0, cardinality), every id of the vocabulary can occur, id_counts equal the train ids."""
    schema, tables = _load(folder)
    counts = load_id_counts(folder)
    assert set(counts) == set(schema.sparse)
    for split, table in tables.items():
        assert len(table["label"]) == schema.rows[split]
        assert set(np.unique(table["label"])) <= {0.0, 1.0}
        assert table["label"].dtype == np.float32
        for name in schema.dense:
            assert table[name].dtype == np.float32 and np.isfinite(table[name]).all()
        for name in schema.sparse:
            ids = table[name]
            assert ids.dtype == np.int64
            assert ids.min() >= 0 and ids.max() < schema.cardinalities[name], (split, name)
    for name in schema.sparse:
        expected = np.bincount(tables["train"][name], minlength=schema.cardinalities[name])
        np.testing.assert_array_equal(counts[name], expected)
    return schema


# ----------------------------------------------------------------------------------------------------- Criteo


def _criteo_line(label: str = "0", ints: dict[int, str] | None = None, cats: dict[int, str] | None = None) -> str:
    """A Criteo TSV line: I1..I13 default "1", C1..C26 default "a1b2c3d4"; keys are 1-based column numbers."""
    i_fields = [(ints or {}).get(j, "1") for j in range(1, 14)]
    c_fields = [(cats or {}).get(k, "a1b2c3d4") for k in range(1, 27)]
    return "\t".join([label, *i_fields, *c_fields]) + "\n"


# C1 over 14 lines: 12 train (days 1-6 of 2 lines), line 13 val, line 14 test.
TINY_C1 = ["ff", "ff", "ff", "0a", "0a", "1c", "", "", "ff", "FF", "2b", "2b", "0a", "7777"]
TINY_I1 = ["", "-2", "9", "0", "1", "2", "3", "4", "5", "6", "7", "8", "1000", "12"]


def _tiny_criteo_lines() -> list[str]:
    return [
        _criteo_line(str(n % 2), {1: TINY_I1[n]}, {1: TINY_C1[n], 2: "" if n == 3 else f"{n % 3:x}"})
        for n in range(len(TINY_C1))
    ]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines))
    return path


def _reference_criteo(lines: list[str], train_rows: int, min_count: int) -> tuple[np.ndarray, ...]:
    """A naive per-row implementation of the documented rules: labels, dense (R, 13), ids (26, R)."""
    fields = [line.rstrip("\n").split("\t") for line in lines]
    labels = np.array([float(f[0]) for f in fields], dtype=np.float32)
    dense = np.array([[np.log1p(max(int(x or 0), 0)) for x in f[1:14]] for f in fields], dtype=np.float32)
    ids = np.zeros((26, len(fields)), dtype=np.int64)
    for k in range(26):
        column = [f[14 + k] for f in fields]
        counts = Counter(int(v, 16) for v in column[:train_rows] if v)
        index = {v: i + 2 for i, v in enumerate(sorted(v for v, c in counts.items() if c >= min_count))}
        ids[k] = [1 if v == "" else index.get(int(v, 16), 0) for v in column]
    return labels, dense, ids


@pytest.fixture(scope="module")
def criteo_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    source = _shared("criteo_sample", "train.txt")
    folder = tmp_path_factory.mktemp("criteo_sample")
    # small blocks: ~300 lines each, so block boundaries, carried lines and row-group buffering are exercised
    criteo.prepare_criteo([source], folder, min_count=2, block_bytes=64 << 10)
    return source, folder


def test_criteo_sample_matches_reference_and_day_split(criteo_sample: tuple[Path, Path]) -> None:
    source, folder = criteo_sample
    lines = source.read_text().splitlines(keepends=True)
    assert len(lines) == 9999
    schema, tables = _load(folder)
    # 9,999 lines = 7 days of 1429, 1429, 1429, 1428, 1428, 1428, 1428; day 7 halved into val/test
    assert schema.rows == {"train": 8571, "val": 714, "test": 714}
    assert sum(schema.rows.values()) == len(lines)
    labels, dense, ids = _reference_criteo(lines, train_rows=8571, min_count=2)
    got_labels = np.concatenate([tables[s]["label"] for s in SPLITS])
    np.testing.assert_array_equal(got_labels, labels)
    assert abs(got_labels.mean() - 0.218) < 0.002
    got_dense = np.stack([np.concatenate([tables[s][f"int_{j}"] for s in SPLITS]) for j in range(13)], axis=1)
    np.testing.assert_allclose(got_dense, dense, rtol=1e-6)
    for k in range(26):
        np.testing.assert_array_equal(np.concatenate([tables[s][f"cat_{k}"] for s in SPLITS]), ids[k], f"cat_{k}")
    assert [schema.cardinalities[f"cat_{k}"] for k in range(26)] == [int(ids[k].max()) + 1 for k in range(26)]
    assert schema.source["skipped_rows"] == 0 and schema.source["oov_id"] == 0 and schema.source["missing_id"] == 1


def test_criteo_sample_ids_and_counts(criteo_sample: tuple[Path, Path]) -> None:
    _, folder = criteo_sample
    schema = _check_ids_and_counts(folder)
    counts = load_id_counts(folder)
    for name in schema.sparse:
        # every kept value (ids >= 2) was seen at least min_count=2 times in train
        assert (counts[name][2:] >= 2).all(), name
    assert schema.dense == [f"int_{j}" for j in range(13)] and len(schema.sparse) == 26


def test_split_writer_writes_full_row_groups(tmp_path: Path) -> None:
    writer = SplitWriter(tmp_path, "train", ctr_arrow_schema(1, 1))
    for start in range(0, 150_000, 50_000):
        rows = np.arange(start, start + 50_000)
        writer.write(ctr_table(rows % 2, rows[:, None] / 2, rows[None, :]))
    assert writer.close() == 150_000
    file = pq.ParquetFile(tmp_path / "train.parquet")
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    assert sizes == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 150_000 - 2 * ROW_GROUP_ROWS]
    np.testing.assert_array_equal(file.read(columns=["cat_0"]).column(0).to_numpy(), np.arange(150_000))


def test_criteo_folder_loads_through_the_datamodule(criteo_sample: tuple[Path, Path]) -> None:
    _, folder = criteo_sample
    dm = CTRDataModule(data_dir=str(folder), batch_size=512, shuffle=False)
    assert dm.num_dense == 13 and dm.cardinalities == CTRSchema.load(folder).cardinalities
    batch = next(iter(dm.train_dataloader()))
    assert batch.dense_features.shape == (512, 13) and batch.labels.shape == (512,)
    assert batch.sparse_features.keys() == [f"cat_{k}" for k in range(26)]
    assert batch.sparse_features.lengths().eq(1).all()
    for key, jt in batch.sparse_features.to_dict().items():
        values = jt.values()
        assert values.min() >= 0 and values.max() < dm.cardinalities[key], key
    assert sum(len(b.labels) for b in dm.test_dataloader()) == 714


@pytest.mark.parametrize(
    "min_count, expected_c1, cardinality",
    [(2, [4, 4, 4, 2, 2, 0, 1, 1, 4, 4, 3, 3], 5), (1, [5, 5, 5, 2, 2, 3, 1, 1, 5, 5, 4, 4], 6)],
)
def test_criteo_tiny_oov_missing_and_split(
    tmp_path: Path, min_count: int, expected_c1: list[int], cardinality: int
) -> None:
    source = _write(tmp_path / "train.txt", _tiny_criteo_lines())
    schema = criteo.prepare_criteo([source], tmp_path / "out", min_count=min_count)
    _, tables = _load(tmp_path / "out")
    assert schema.rows == {"train": 12, "val": 1, "test": 1}
    # C1 train values by hex value: 0x0a (x2), 0x1c (x1), 0x2b (x2), 0xff (x5, "FF" included); "" missing
    assert tables["train"]["cat_0"].tolist() == expected_c1
    assert tables["val"]["cat_0"].tolist() == [2]  # 0a
    assert tables["test"]["cat_0"].tolist() == [0]  # 7777 never seen in train: OOV
    assert schema.cardinalities["cat_0"] == cardinality
    # C2: "" on line 4 -> missing id 1; values "0", "1", "2" (x4 each but one) -> 2, 3, 4
    assert tables["train"]["cat_1"][:4].tolist() == [2, 3, 4, 1]
    counts = load_id_counts(tmp_path / "out")["cat_0"]
    assert counts.tolist() == np.bincount(expected_c1, minlength=cardinality).tolist()
    # I1: "" -> 0, -2 -> 0 (clipped), 9 -> log(10)
    np.testing.assert_allclose(tables["train"]["int_0"][:3], [0.0, 0.0, np.log(10.0)], rtol=1e-6)
    assert tables["test"]["label"].tolist() == [1.0] and tables["train"]["label"][:2].tolist() == [0.0, 1.0]
    _check_ids_and_counts(tmp_path / "out")


def test_criteo_day_files_with_gzip(tmp_path: Path) -> None:
    lines = _tiny_criteo_lines()
    day0 = _write(tmp_path / "day_0", lines[:5])
    with gzip.open(tmp_path / "day_1.gz", "wt") as f:
        f.writelines(lines[5:10])
    day2 = _write(tmp_path / "day_2", lines[10:])
    criteo.main(
        [
            "--days",
            str(day0),
            str(tmp_path / "day_1.gz"),
            str(day2),
            "--output",
            str(tmp_path / "out"),
            "--min-count",
            "1",
        ]
    )
    schema, tables = _load(tmp_path / "out")
    assert schema.rows == {"train": 10, "val": 2, "test": 2}
    assert schema.source["dataset"] == "criteo-1tb"
    # train C1 (days 0-1): ff, 0a, 1c, "" -> 0a=2, 1c=3, ff=4; the last day's 2b, 2b, 0a, 7777: 2b is new (OOV)
    assert tables["train"]["cat_0"].tolist() == [4, 4, 4, 2, 2, 3, 1, 1, 4, 4]
    assert tables["val"]["cat_0"].tolist() == [0, 0] and tables["test"]["cat_0"].tolist() == [2, 0]
    _check_ids_and_counts(tmp_path / "out")


BAD_CRITEO_LINES = {
    "39 fields": ("\t".join(_criteo_line().rstrip("\n").split("\t")[1:]) + "\n", "has 39 fields"),
    "41 fields": (_criteo_line().rstrip("\n") + "\textra\n", "has 41 fields"),
    "blank line": ("\n", "label is '', expected 0 or 1"),  # a blank line reads as a row of empty fields
    "label": (_criteo_line(label="2"), "label is '2', expected 0 or 1"),
    "int": (_criteo_line(ints={4: "3.5"}), "I4 is '3.5', expected an integer"),
    "hex": (_criteo_line(cats={9: "xyz"}), "C9 is 'xyz', expected up to 8 hex digits"),
    "long hex": (_criteo_line(cats={26: "123456789"}), "C26 is '123456789'"),
}


@pytest.mark.parametrize("kind", list(BAD_CRITEO_LINES))
# 600 bytes: two or three lines a block, so the bad line sits at a block boundary or beside one
@pytest.mark.parametrize("block_bytes", [1 << 20, 600])
def test_criteo_malformed_rows_raise_with_line_number(tmp_path: Path, kind: str, block_bytes: int) -> None:
    lines = _tiny_criteo_lines()
    bad_line, message = BAD_CRITEO_LINES[kind]
    lines[10] = bad_line  # physical line 11
    source = _write(tmp_path / "train.txt", lines)
    with pytest.raises(ValueError, match="line 11") as error:
        criteo.prepare_criteo([source], tmp_path / "out", min_count=1, block_bytes=block_bytes)
    assert message in str(error.value) and "--skip-bad-rows" in str(error.value) and str(source) in str(error.value)
    assert not (tmp_path / "out" / "schema.json").exists()


def test_criteo_skip_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = _tiny_criteo_lines()
    lines[2] = _criteo_line(label="yes")  # train line 3
    lines[8] = _criteo_line(cats={1: "g"})  # train line 9
    lines.insert(5, "1\t2\t3\n")  # a short line 6; the file now has 15 lines and the bad hex is on line 10
    source = _write(tmp_path / "train.txt", lines)
    with caplog.at_level(logging.WARNING, logger="data_scripts"):
        schema = criteo.prepare_criteo([source], tmp_path / "out", min_count=1, skip_bad_rows=True, block_bytes=600)
    assert schema.source["skipped_rows"] == 3
    # 15 lines: days of 3, 2, 2, 2, 2, 2, 2 -> train lines 1-13 (3 skipped), val line 14, test line 15
    assert schema.rows == {"train": 10, "val": 1, "test": 1} and sum(schema.rows.values()) == 15 - 3
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "line 3" in logged and "line 6" in logged and "line 10" in logged and "Skipped 3" in logged
    _check_ids_and_counts(tmp_path / "out")


def test_criteo_main_reports_errors_and_checks_sizes(tmp_path: Path) -> None:
    lines = _tiny_criteo_lines()
    lines[0] = _criteo_line(label="x")
    source = _write(tmp_path / "train.txt", lines)
    with pytest.raises(SystemExit, match="line 1"):
        criteo.main(["--input", str(source), "--output", str(tmp_path / "out")])
    short = _write(tmp_path / "short.txt", _tiny_criteo_lines()[:13])
    with pytest.raises(ValueError, match="too few lines"):
        criteo.prepare_criteo([short], tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        criteo.prepare_criteo([tmp_path / "missing.txt"], tmp_path / "out")


def test_read_delimited_line_numbers_across_blocks(tmp_path: Path) -> None:
    source = _write(tmp_path / "t.tsv", [f"{i}\t{i * i}\n" for i in range(1, 200)] + ["7\n", "8\t64"])
    bad = BadRows(skip=True, quiet=True)
    got = list(read_delimited(source, ["a", "b"], delimiter=b"\t", bad=bad, layout="a, b", block_bytes=37))
    lines = np.concatenate([lines for _, lines in got])
    first = np.concatenate([t.column("a").to_numpy(zero_copy_only=False) for t, _ in got])
    assert bad.count == 1 and lines.tolist() == [*range(1, 200), 201]
    assert [int(x) for x in first] == [*range(1, 200), 8]


# ----------------------------------------------------------------------------------------------------- Frappe


def _reference_libfm(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    rows = [line.split() for path in paths for line in path.read_text().splitlines()]
    labels = np.array([1.0 if r[0] == "1" else 0.0 for r in rows], dtype=np.float32)
    raw = np.array([[int(x.split(":")[0]) for x in r[1:]] for r in rows], dtype=np.int64).T
    return labels, raw


def _as_rows(tables: dict[str, dict[str, np.ndarray]], splits: tuple[str, ...], fields: int) -> np.ndarray:
    """(label, cat_0..) rows of the given splits stacked, lexicographically sorted (a multiset to compare)."""
    rows = np.concatenate(
        [np.stack([tables[s]["label"], *(tables[s][f"cat_{f}"] for f in range(fields))], axis=1) for s in splits]
    )
    return rows[np.lexsort(rows.T[::-1])]


def test_frappe_random_split_matches_reference(tmp_path: Path) -> None:
    files = [_shared("frappe", "frappe.validation.libfm"), _shared("frappe", "frappe.test.libfm")]
    schema = frappe.prepare_frappe(tmp_path / "out", inputs=files, seed=5)
    labels, raw = _reference_libfm(files)
    assert sum(schema.rows.values()) == len(labels) == 57722 + 28860
    assert list(schema.rows.values()) == split_sizes(len(labels), (0.7, 0.2, 0.1))
    assert abs(labels.mean() - 0.33) < 0.005
    expected = np.stack([labels, *(np.unique(raw[f], return_inverse=True)[1].reshape(-1) for f in range(10))], axis=1)
    expected = expected[np.lexsort(expected.T[::-1])]
    _, tables = _load(tmp_path / "out")
    np.testing.assert_array_equal(_as_rows(tables, SPLITS, 10), expected)
    assert [schema.cardinalities[f"cat_{f}"] for f in range(10)] == [len(np.unique(raw[f])) for f in range(10)]
    assert schema.dense == [] and schema.source["fields"]["cat_0"] == "user"
    _check_ids_and_counts(tmp_path / "out")


def _tiny_libfm(path: Path, rows: list[tuple[int, list[int]]]) -> Path:
    return _write(path, [" ".join([str(label), *(f"{i}:1" for i in ids)]) + "\r\n" for label, ids in rows])


TINY_FRAPPE = [(-1 if n % 3 else 1, [100 + n % 4, 200 + n % 5, *range(300, 307), 400 + n % 2]) for n in range(20)]


def test_frappe_given_files_and_exact_ids(tmp_path: Path) -> None:
    train = _tiny_libfm(tmp_path / "a.libfm", TINY_FRAPPE[:12])
    val = _tiny_libfm(tmp_path / "b.libfm", TINY_FRAPPE[12:16])
    test = _tiny_libfm(tmp_path / "c.libfm", [*TINY_FRAPPE[16:], (1, [999, 200, *range(300, 307), 400])])
    frappe.main(["--train", str(train), "--val", str(val), "--test", str(test), "--output", str(tmp_path / "out")])
    schema, tables = _load(tmp_path / "out")
    assert schema.rows == {"train": 12, "val": 4, "test": 5}
    assert tables["train"]["label"].tolist() == [1.0 if n % 3 == 0 else 0.0 for n in range(12)]
    assert tables["train"]["cat_0"].tolist() == [n % 4 for n in range(12)]  # 100..103 -> 0..3
    assert tables["test"]["cat_0"].tolist()[-1] == 4 and schema.cardinalities["cat_0"] == 5  # 999 -> 4
    assert schema.cardinalities["cat_2"] == 1 and schema.cardinalities["cat_9"] == 2
    _check_ids_and_counts(tmp_path / "out")


def test_frappe_random_split_is_seeded(tmp_path: Path) -> None:
    source = _tiny_libfm(tmp_path / "all.libfm", TINY_FRAPPE)
    runs = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        schema = frappe.prepare_frappe(tmp_path / name, inputs=[source], seed=seed)
        assert schema.rows == {"train": 14, "val": 4, "test": 2}
        runs[name] = pq.read_table(tmp_path / name / "train.parquet")
    assert runs["a"].equals(runs["b"]) and not runs["a"].equals(runs["c"])
    with pytest.raises(ValueError, match="Give either"):
        frappe.prepare_frappe(tmp_path / "d", inputs=[source], train=source)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1 1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1", "has 10 fields"),
        ("2 1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1 10:1", "label is '2'"),
        ("1 1:1 2:1 3:1 4:1 5:1 6:0.5 7:1 8:1 9:1 10:1", "homework is '6:0.5'"),
        ("1 1:1 2:1 3:1 4:1 5:1 6:1 7:1 8:1 9:1 x:1", "city is 'x:1'"),
    ],
)
def test_frappe_malformed_rows(tmp_path: Path, line: str, message: str) -> None:
    good = _tiny_libfm(tmp_path / "good.libfm", TINY_FRAPPE)
    lines = good.read_text().splitlines(keepends=True)
    lines[6] = line + "\n"
    source = _write(tmp_path / "bad.libfm", lines)
    with pytest.raises(ValueError, match="line 7") as error:
        frappe.prepare_frappe(tmp_path / "out", inputs=[source])
    assert message in str(error.value) and str(source) in str(error.value)
    schema = frappe.prepare_frappe(tmp_path / "out", inputs=[source], skip_bad_rows=True)
    assert sum(schema.rows.values()) == len(TINY_FRAPPE) - 1 and schema.source["skipped_rows"] == 1


# -------------------------------------------------------------------------------------------------- MovieLens


def test_movielens_100k_time_split(tmp_path: Path) -> None:
    folder = _shared("ml-100k")
    schema = movielens.prepare_movielens(folder, tmp_path / "out")
    raw = np.loadtxt(folder / "u.data", dtype=np.int64)
    assert schema.rows == {"train": 80000, "val": 10000, "test": 10000}
    zips = len(schema.source["vocabularies"]["cat_5"])
    assert list(schema.cardinalities.values()) == [943, 1682, 2, 7, 21, zips, 19, 19]
    _, tables = _load(tmp_path / "out")
    # the documented order: timestamp, then user, then item; raw ids 1..n become 0..n-1
    order = np.lexsort((raw[:, 1], raw[:, 0], raw[:, 3]))
    users = np.concatenate([tables[s]["cat_0"] for s in SPLITS])
    items = np.concatenate([tables[s]["cat_1"] for s in SPLITS])
    np.testing.assert_array_equal(users, raw[order, 0] - 1)
    np.testing.assert_array_equal(items, raw[order, 1] - 1)
    labels = np.concatenate([tables[s]["label"] for s in SPLITS])
    np.testing.assert_array_equal(labels, (raw[order, 2] >= 4).astype(np.float32))
    assert abs(labels.mean() - 0.554) < 0.001
    assert raw[order[:80000], 3].max() <= raw[order[80000:], 3].min()
    # side features follow the user/item tables
    user_rows = [line.split("|") for line in (folder / "u.user").read_text().splitlines()]
    age = np.array([int(r[1]) for r in user_rows])
    np.testing.assert_array_equal(
        tables["train"]["cat_3"], np.searchsorted([18, 25, 35, 45, 50, 56], age, "right")[tables["train"]["cat_0"]]
    )
    genders = np.array([r[2] for r in user_rows])
    assert (np.array(["F", "M"])[tables["train"]["cat_2"]] == genders[tables["train"]["cat_0"]]).all()
    item_rows = [line.split("|") for line in (folder / "u.item").read_text(encoding="latin-1").splitlines()]
    first_genre = np.array([[x == "1" for x in r[-19:]].index(True) for r in item_rows])
    np.testing.assert_array_equal(tables["test"]["cat_6"], first_genre[tables["test"]["cat_1"]])
    _check_ids_and_counts(tmp_path / "out")
    dm = CTRDataModule(data_dir=str(tmp_path / "out"), batch_size=1000)
    batch = next(iter(dm.val_dataloader()))
    assert batch.dense_features.shape == (1000, 0) and batch.sparse_features.keys() == [f"cat_{f}" for f in range(8)]
    for key, jt in batch.sparse_features.to_dict().items():
        assert 0 <= int(jt.values().min()) and int(jt.values().max()) < dm.cardinalities[key]


def test_movielens_100k_random_split_and_threshold(tmp_path: Path) -> None:
    folder = _shared("ml-100k")
    schema = movielens.prepare_movielens(folder, tmp_path / "out", split="random", seed=3, threshold=5)
    raw = np.loadtxt(folder / "u.data", dtype=np.int64)
    _, tables = _load(tmp_path / "out")
    assert schema.rows == {"train": 80000, "val": 10000, "test": 10000}
    assert sum(tables[s]["label"].sum() for s in SPLITS) == (raw[:, 2] >= 5).sum()
    # documented rule: default_rng(seed).permutation, cut 80/10/10, file order kept inside a split
    test_rows = np.sort(np.random.default_rng(3).permutation(len(raw))[90000:])
    np.testing.assert_array_equal(tables["test"]["cat_0"], raw[test_rows, 0] - 1)
    np.testing.assert_array_equal(tables["test"]["label"], (raw[test_rows, 2] >= 5).astype(np.float32))


def _tiny_ml1m(folder: Path, ratings: list[str]) -> Path:
    folder.mkdir()
    _write(folder / "ratings.dat", ratings)
    _write(folder / "users.dat", ["1::F::1::10::48067\n", "2::M::56::16::70072\n", "5::M::25::15::55117-1234\n"])
    (folder / "movies.dat").write_bytes(
        "10::Caf\xe9 (1995)::Comedy|Drama\n20::Heat: Two (1995)::Sci-Fi\n".encode("latin-1")
    )
    return folder


def test_movielens_1m_format(tmp_path: Path) -> None:
    ratings = [
        f"{u}::{m}::{r}::{t}\n" for u, m, r, t in [(1, 10, 5, 30), (2, 20, 3, 10), (5, 10, 4, 20), (1, 20, 1, 40)] * 5
    ]
    folder = _tiny_ml1m(tmp_path / "ml-1m", ratings)
    movielens.main(["--input", str(folder), "--output", str(tmp_path / "out")])
    schema, tables = _load(tmp_path / "out")
    assert schema.source["dataset"] == "ml-1m" and schema.rows == {"train": 16, "val": 2, "test": 2}
    assert list(schema.cardinalities.values()) == [3, 2, 2, 7, 3, 3, 19, 19]
    # time order: t=10 (user 2), 20 (user 5), 30 (user 1), 40 (user 1), each 5 times
    assert tables["train"]["cat_0"].tolist() == [1] * 5 + [2] * 5 + [0] * 5 + [0]
    assert tables["train"]["label"].tolist() == [0.0] * 5 + [1.0] * 10 + [0.0]
    assert tables["train"]["cat_3"].tolist()[:11] == [6] * 5 + [2] * 5 + [0]  # ages 56, 25, 1
    assert tables["train"]["cat_6"].tolist()[:11] == [15] * 5 + [5] * 6  # Sci-Fi; Comedy|Drama -> Comedy
    assert tables["train"]["cat_7:lists"].tolist()[4:6] == [[15], [5, 8]]  # every genre: Sci-Fi; Comedy, Drama
    _check_ids_and_counts(tmp_path / "out")


def test_movielens_errors(tmp_path: Path) -> None:
    folder = _tiny_ml1m(tmp_path / "ml-1m", ["1::10::5::30\n", "2::20::x::10\n"])
    with pytest.raises(ValueError, match=r"ratings.dat, line 2: rating is 'x'"):
        movielens.prepare_movielens(folder, tmp_path / "out")
    _write(folder / "ratings.dat", ["1::10::5::30\n", "3::20::4::10\n"])
    with pytest.raises(ValueError, match=r"line 2: user 3 is not in the user table"):
        movielens.prepare_movielens(folder, tmp_path / "out")
    (folder / "users.dat").unlink()
    with pytest.raises(ValueError, match="not supported"):
        movielens.prepare_movielens(folder, tmp_path / "out")
    with pytest.raises(SystemExit, match="neither u.data"):
        movielens.main(["--input", str(tmp_path), "--output", str(tmp_path / "out")])

"""The Avazu data script on tiny hand-written files in the Kaggle ``train`` format (known vocabularies, OOV ids,
hour features, both splits, every malformed-row path) and on generated files (block-size independence, the CTR
data module reading the output). Everything is written under ``tmp_path``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.raw_formats import write_avazu
from data_scripts import avazu
from data_scripts._vocab import random_split_codes
from recsys_embed.data import CTRDataModule, CTRSchema, load_id_counts

SPLITS = ("train", "val", "test")
SITE = avazu.CATEGORICAL.index("site_id") + 2  # cat_ index: hour_of_day and weekday come first
C20 = avazu.CATEGORICAL.index("C20") + 2


def _line(click: str = "0", hour: str = "14102100", **values: str) -> str:
    """An Avazu train row; hashed columns default to ``0000abcd``, integer columns to ``7``."""
    fields = [values.pop("id", "1000009418151094273"), click, hour]
    fields += [values.get(c, "0000abcd" if c in avazu.HEX_COLUMNS else "7") for c in avazu.CATEGORICAL]
    return ",".join(fields) + "\n"


# 12 rows over three days: 2014-10-21 (a Tuesday) x4, 10-22 x3, 10-23 x5 -> train 7, val 3, test 2
HOURS = ["14102100", "14102105", "14102123", "14102123", "14102201", "14102202", "14102203"]
HOURS += ["14102300", "14102310", "14102311", "14102312", "14102313"]
SITES = ["0000000a", "0000000a", "000000FF", "00000001", "000000ff", "0000000a", "0000abcd"]
SITES += ["000000ff", "00000001", "12345678", "0000000a", "0000abcd"]
C20S = ["-1", "-1", "100084", "-1", "100084", "5", "5", "5", "-1", "77", "100084", "-1"]


def _tiny(path: Path, lines: list[str] | None = None) -> Path:
    rows = lines or [_line(str(n % 2), HOURS[n], site_id=SITES[n], C20=C20S[n]) for n in range(12)]
    path.write_text(avazu.HEADER + "\n" + "".join(rows))
    return path


def _columns(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return {
        split: {n: c.to_numpy() for n, c in zip(t.column_names, t.columns)}
        for split in SPLITS
        for t in [pq.read_table(folder / f"{split}.parquet")]
    }


@pytest.mark.parametrize(
    "min_count, train_sites, heldout_sites, site_cardinality",
    [(2, [1, 1, 2, 0, 2, 1, 0], [2, 0, 0, 1, 0], 3), (1, [2, 2, 3, 1, 3, 2, 4], [3, 1, 0, 2, 4], 5)],
)
def test_avazu_time_split_vocabulary_and_hour_features(
    tmp_path: Path, min_count: int, train_sites: list[int], heldout_sites: list[int], site_cardinality: int
) -> None:
    schema = avazu.prepare_avazu(_tiny(tmp_path / "train.csv"), tmp_path / "out", min_count=min_count)
    assert schema.rows == {"train": 7, "val": 3, "test": 2}  # last day's 5 rows halved: 3 val, 2 test
    got = _columns(tmp_path / "out")
    # site_id in train by hex value: 0x1 (x1), 0xa (x3), 0xff (x2, "FF" included), 0xabcd (x1)
    assert got["train"][f"cat_{SITE}"].tolist() == train_sites
    assert [*got["val"][f"cat_{SITE}"], *got["test"][f"cat_{SITE}"]] == heldout_sites
    assert schema.cardinalities[f"cat_{SITE}"] == site_cardinality
    assert got["train"]["cat_0"].tolist() == [0, 5, 23, 23, 1, 2, 3]  # hour of day
    assert got["train"]["cat_1"].tolist() == [1, 1, 1, 1, 2, 2, 2]  # weekday: 2014-10-21 was a Tuesday
    assert got["test"]["cat_1"].tolist() == [3, 3] and got["test"]["cat_0"].tolist() == [12, 13]
    assert schema.cardinalities["cat_0"] == 24 and schema.cardinalities["cat_1"] == 7
    assert got["train"]["label"].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert schema.dense == [] and len(schema.sparse) == 23 and "id" not in schema.source["columns"].values()
    counts = load_id_counts(tmp_path / "out")
    assert counts[f"cat_{SITE}"].tolist() == np.bincount(train_sites, minlength=site_cardinality).tolist()


def test_avazu_negative_integers_and_unseen_values(tmp_path: Path) -> None:
    avazu.prepare_avazu(_tiny(tmp_path / "train.csv"), tmp_path / "out", min_count=2)
    got = _columns(tmp_path / "out")
    # C20 in train: -1 (x3), 5 (x2), 100084 (x2) -> ids 1, 2, 3 in ascending integer order; 77 never seen -> 0
    assert got["train"][f"cat_{C20}"].tolist() == [1, 1, 3, 1, 3, 2, 2]
    assert [*got["val"][f"cat_{C20}"], *got["test"][f"cat_{C20}"]] == [2, 1, 0, 3, 1]


def test_avazu_random_split_follows_the_line_hash(tmp_path: Path) -> None:
    source = write_avazu(tmp_path / "train.csv", rows=3000, seed=1, days=2)
    schema = avazu.prepare_avazu(source, tmp_path / "out", split="random", seed=4, min_count=1)
    codes = random_split_codes(np.arange(2, 3002), seed=4)  # data rows are lines 2..3001
    assert list(schema.rows.values()) == np.bincount(codes, minlength=3).tolist()
    raw = np.loadtxt(source, delimiter=",", skiprows=1, usecols=1, dtype=np.int64)
    for code, split in enumerate(SPLITS):
        np.testing.assert_array_equal(pq.read_table(tmp_path / "out" / f"{split}.parquet")["label"], raw[codes == code])


def test_avazu_block_size_does_not_change_the_output(tmp_path: Path) -> None:
    source = write_avazu(tmp_path / "train.csv", rows=1500, seed=2, days=3)
    for name, block in [("small", 400), ("large", 1 << 20)]:  # 400 bytes: about 3 rows a block
        avazu.prepare_avazu(source, tmp_path / name, block_bytes=block)
    for split in SPLITS:
        assert pq.read_table(tmp_path / "small" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "large" / f"{split}.parquet")
        )
    assert (tmp_path / "small" / "schema.json").read_text() == (tmp_path / "large" / "schema.json").read_text()


def test_avazu_output_loads_through_the_datamodule(tmp_path: Path) -> None:
    source = write_avazu(tmp_path / "train.csv", rows=3000, seed=3, days=3)
    avazu.main(["--input", str(source), "--output", str(tmp_path / "out")])
    dm = CTRDataModule(data_dir=str(tmp_path / "out"), batch_size=256, shuffle=False)
    assert dm.num_dense == 0 and dm.cardinalities == CTRSchema.load(tmp_path / "out").cardinalities
    batch = next(iter(dm.train_dataloader()))
    assert batch.dense_features.shape == (256, 0) and batch.labels.shape == (256,)
    assert batch.sparse_features.keys() == [f"cat_{k}" for k in range(23)]
    for key, jt in batch.sparse_features.to_dict().items():
        assert 0 <= int(jt.values().min()) and int(jt.values().max()) < dm.cardinalities[key], key


BAD_ROWS = {
    "23 fields": (_line().replace(",7\n", "\n"), "has 23 fields separated by ','"),
    "25 fields": (_line().replace("\n", ",9\n"), "has 25 fields"),
    "click": (_line(click="yes"), "click is 'yes', expected 0 or 1"),
    "click 2": (_line(click="2"), "click is '2', expected 0 or 1"),
    "hour 24": (_line(hour="14102124"), "hour is '14102124', expected YYMMDDHH"),
    "31 Feb": (_line(hour="14023101"), "hour is '14023101'"),
    "7 digits": (_line(hour="1410210"), "hour is '1410210'"),
    "hex": (_line(site_id="0000abcg"), "site_id is '0000abcg', expected 8 hex digits"),
    "empty hex": (_line(device_ip=""), "device_ip is '', expected 8 hex digits"),
    "integer": (_line(C14="15706.0"), "C14 is '15706.0', expected an integer"),
    "hex prefix": (_line(C15="0x10"), "C15 is '0x10', expected an integer"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_avazu_malformed_rows_raise_or_are_skipped(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    bad_line, message = BAD_ROWS[kind]
    lines = [_line(str(n % 2), HOURS[n], site_id=SITES[n]) for n in range(12)]
    lines[2] = bad_line.replace("14102100", HOURS[2]) if "hour" not in message else bad_line  # file line 4
    source = _tiny(tmp_path / "train.csv", lines)
    with pytest.raises(ValueError, match="line 4") as error:
        avazu.prepare_avazu(source, tmp_path / "out", block_bytes=300)
    assert message in str(error.value) and str(source) in str(error.value) and "--skip-bad-rows" in str(error.value)
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING, logger="data_scripts"):
        schema = avazu.prepare_avazu(source, tmp_path / "out", skip_bad_rows=True)
    assert schema.source["skipped_rows"] == 1 and schema.rows == {"train": 6, "val": 3, "test": 2}
    assert "line 4" in caplog.text and "Skipped 1" in caplog.text


def test_avazu_file_level_errors(tmp_path: Path) -> None:
    test_file = tmp_path / "test.csv"
    test_file.write_text(avazu.HEADER.replace("click,", "") + "\n")
    with pytest.raises(ValueError, match="unlabelled Avazu test file is not supported"):
        avazu.prepare_avazu(test_file, tmp_path / "out")
    no_header = tmp_path / "rows.csv"
    no_header.write_text(_line())
    with pytest.raises(ValueError, match="line 1: expected the Avazu header"):
        avazu.prepare_avazu(no_header, tmp_path / "out")
    lines = [_line(hour=h) for h in ["14102100", "14102200", "14102123", "14102201"] * 15]
    with pytest.raises(ValueError, match=r"line 4: its hour is on a day before .*--split random"):
        avazu.prepare_avazu(_tiny(tmp_path / "unsorted.csv", lines), tmp_path / "out")
    avazu.prepare_avazu(tmp_path / "unsorted.csv", tmp_path / "out", split="random", min_count=1)
    one_day = _tiny(tmp_path / "one_day.csv", [_line(hour="14102100")] * 5)
    with pytest.raises(ValueError, match="needs at least 2"):
        avazu.prepare_avazu(one_day, tmp_path / "out2")
    with pytest.raises(SystemExit, match="error: .*does not exist"):
        avazu.main(["--input", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "out3")])

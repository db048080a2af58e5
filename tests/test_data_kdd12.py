"""The KDD Cup 2012 track 2 script against a naive per-row reference of its documented rules (labels, impression
expansion, min-count vocabularies, user profiles, the seeded line-hash split), block-size independence, the data
module reading its output, and every malformed-row path. The files are generated or hand-written under
``tmp_path``; the split rule itself is checked for its proportions and determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.raw_formats import write_kdd12, write_kdd12_profiles
from data_scripts import kdd12
from data_scripts._vocab import random_split_codes
from recsys_embed.data import CTRDataModule, load_id_counts

SPLITS = ("train", "val", "test")


def _reference(source: Path, seed: int, min_count: int, expand: bool, profiles: Path | None = None):
    """Per-split lists of (label, ids...) rows, computed line by line from the documented rules."""
    rows = [[int(x) for x in line.split("\t")] for line in source.read_text().splitlines()]
    codes = random_split_codes(np.arange(1, len(rows) + 1), seed)
    vocabularies = []
    for f in range(10):
        counts: Counter[int] = Counter()
        for row, code in zip(rows, codes):
            if code == 0:
                counts[row[2 + f]] += row[1] if expand else 1
        kept = sorted(v for v, c in counts.items() if c >= min_count)
        vocabularies.append({v: i + 1 for i, v in enumerate(kept)})
    profile = {}
    if profiles is not None:
        for line in profiles.read_text().splitlines():
            user, gender, age = (int(x) for x in line.split("\t"))
            profile[user] = (gender + 1, age + 1)
    out: dict[int, list[tuple[int, ...]]] = {0: [], 1: [], 2: []}
    for row, code in zip(rows, codes):
        ids = tuple(vocabularies[f].get(row[2 + f], 0) for f in range(10))
        if profiles is not None:
            ids += profile.get(row[11], (0, 0))
        labels = [1] * row[0] + [0] * (row[1] - row[0]) if expand else [int(row[0] > 0)]
        out[int(code)].extend((label, *ids) for label in labels)
    return out, vocabularies


def _rows(folder: Path, split: str) -> list[tuple[int, ...]]:
    table = pq.read_table(folder / f"{split}.parquet")
    names = ["label", *(n for n in table.column_names if n.startswith("cat_"))]
    return [tuple(int(x) for x in row) for row in zip(*(table[n].to_numpy() for n in names))]


@pytest.mark.parametrize("expand", [False, True])
def test_kdd12_matches_the_reference(tmp_path: Path, expand: bool) -> None:
    source = write_kdd12(tmp_path / "training.txt", rows=3000, seed=5)
    profiles = write_kdd12_profiles(tmp_path / "userid_profile.txt", users=400_000, seed=5)
    schema = kdd12.prepare_kdd12(
        source, tmp_path / "out", user_profile=profiles, expand_impressions=expand, seed=7, min_count=2
    )
    expected, vocabularies = _reference(source, seed=7, min_count=2, expand=expand, profiles=profiles)
    for code, split in enumerate(SPLITS):
        assert _rows(tmp_path / "out", split) == expected[code], split
        assert schema.rows[split] == len(expected[code])
    assert [schema.cardinalities[f"cat_{f}"] for f in range(10)] == [len(v) + 1 for v in vocabularies]
    assert schema.cardinalities["cat_10"] == 4 and schema.cardinalities["cat_11"] == 8
    train = np.array(expected[0])
    counts = load_id_counts(tmp_path / "out")
    for f in range(12):
        assert counts[f"cat_{f}"].tolist() == np.bincount(train[:, 1 + f], minlength=len(counts[f"cat_{f}"])).tolist()
    assert schema.source["columns"]["cat_0"] == "display_url" and schema.source["columns"]["cat_11"] == "age"


def test_kdd12_expansion_and_64_bit_urls_by_hand(tmp_path: Path) -> None:
    lines = [
        "2\t3\t18446744073709551615\t1\t1\t1\t1\t1\t1\t1\t1\t1\n",
        "0\t1\t18446744073709551614\t1\t1\t1\t1\t1\t1\t1\t1\t1\n",
    ]
    source = tmp_path / "training.txt"
    source.write_text("".join(lines * 30))
    folder = tmp_path / "out"
    schema = kdd12.prepare_kdd12(source, folder, expand_impressions=True, min_count=1)
    labels = np.concatenate([pq.read_table(folder / f"{s}.parquet")["label"].to_numpy() for s in SPLITS])
    assert len(labels) == 30 * 4 and labels.sum() == 30 * 2  # 3 + 1 impressions, 2 clicks per line pair
    assert schema.cardinalities["cat_0"] == 3  # the two largest uint64 values stay distinct: ids 1 and 2
    url = pq.read_table(folder / "train.parquet")["cat_0"].to_numpy()
    assert set(url.tolist()) == {1, 2}


def test_kdd12_block_size_does_not_change_the_output(tmp_path: Path) -> None:
    source = write_kdd12(tmp_path / "training.txt", rows=1500, seed=1)
    for name, block in [("small", 300), ("large", 1 << 20)]:  # 300 bytes: about 5 lines a block
        kdd12.prepare_kdd12(source, tmp_path / name, block_bytes=block, min_count=2)
    for split in SPLITS:
        assert pq.read_table(tmp_path / "small" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "large" / f"{split}.parquet")
        )


def test_kdd12_output_loads_through_the_datamodule(tmp_path: Path) -> None:
    source = write_kdd12(tmp_path / "training.txt", rows=3000, seed=2)
    kdd12.main(["--input", str(source), "--output", str(tmp_path / "out"), "--min-count", "2"])
    dm = CTRDataModule(data_dir=str(tmp_path / "out"), batch_size=256, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch.dense_features.shape == (256, 0) and batch.sparse_features.keys() == [f"cat_{k}" for k in range(10)]
    for key, jt in batch.sparse_features.to_dict().items():
        assert 0 <= int(jt.values().min()) and int(jt.values().max()) < dm.cardinalities[key], key


def test_random_split_codes_proportions_and_determinism() -> None:
    lines = np.arange(1, 200_001)
    codes = random_split_codes(lines, seed=0)
    np.testing.assert_allclose(np.bincount(codes) / len(lines), [0.8, 0.1, 0.1], atol=0.004)
    np.testing.assert_array_equal(random_split_codes(lines[::-1], seed=0), codes[::-1])  # a row's own line only
    assert (random_split_codes(lines, seed=1) != codes).mean() > 0.2


GOOD = "0\t1\t5\t1\t1\t1\t1\t1\t1\t1\t1\t1"
BAD_LINES = {
    "11 fields": (GOOD.rsplit("\t", 1)[0], "has 11 fields separated by '\\t'"),
    "click": ("x" + GOOD[1:], "click is 'x', expected a non-negative integer"),
    "impression 0": ("0\t0" + GOOD[3:], "impression is '0', expected a positive integer"),
    "more clicks": ("3\t2" + GOOD[3:], "click is '3', expected at most the impression count"),
    "negative": (GOOD[:-1] + "-4", "user_id is '-4', expected a non-negative integer"),
    "overflow": (GOOD.replace("\t5\t", "\t18446744073709551616\t"), "display_url is '18446744073709551616'"),
    "hex prefix": (GOOD.replace("\t5\t", "\t0x5\t"), "display_url is '0x5'"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_kdd12_malformed_rows_raise_or_are_skipped(tmp_path: Path, kind: str) -> None:
    bad_line, message = BAD_LINES[kind]
    lines = [GOOD] * 60
    lines[40] = bad_line  # line 41
    source = tmp_path / "training.txt"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 41") as error:
        kdd12.prepare_kdd12(source, tmp_path / "out", min_count=1, block_bytes=200)
    assert message in str(error.value) and str(source) in str(error.value) and "--skip-bad-rows" in str(error.value)
    schema = kdd12.prepare_kdd12(source, tmp_path / "out", min_count=1, skip_bad_rows=True)
    assert schema.source["skipped_rows"] == 1 and sum(schema.rows.values()) == 59


def test_kdd12_profile_errors(tmp_path: Path) -> None:
    source = tmp_path / "training.txt"
    source.write_text((GOOD + "\n") * 60)
    profiles = tmp_path / "userid_profile.txt"
    profiles.write_text("1\t1\t2\n2\t0\t1\n1\t2\t3\n")
    with pytest.raises(ValueError, match="user 1 has two profile rows"):
        kdd12.prepare_kdd12(source, tmp_path / "out", user_profile=profiles)
    profiles.write_text("1\t1\t2\n2\t3\t1\n")
    with pytest.raises(ValueError, match=r"userid_profile.txt, line 2: gender is '3', expected 0, 1 or 2"):
        kdd12.prepare_kdd12(source, tmp_path / "out", user_profile=profiles)
    assert not (tmp_path / "out").exists()


def test_parse_decimal_does_not_depend_on_the_block() -> None:
    """The same value is ok or not whether or not its block holds a bad value (cast fast path vs regex path)."""
    import pyarrow as pa

    from data_scripts._vocab import parse_decimal

    values = [b"007", b"-42", b"9" * 18, b"-" + b"9" * 18, b"1" * 19, b"0x1f", b"+3", b"", b"1.0"]
    expected_ok = [True, True, True, True, False, False, False, False, False]
    for value, ok in zip(values, expected_ok):
        for block in ([value], [value, b"bad"], [b"5", value]):
            _, got = parse_decimal(pa.array(block, pa.binary()))
            assert got[block.index(value)] == ok, (value, block)
    uint = [b"18446744073709551615", b"18446744073709551616", b"0" * 19 + b"1", b"0" * 21 + b"1", b"-0"]
    for value, ok in zip(uint, [True, False, True, False, False]):
        for block in ([value], [value, b"bad"]):
            _, got = parse_decimal(pa.array(block, pa.binary()), unsigned=True)
            assert got[0] == ok, (value, block)

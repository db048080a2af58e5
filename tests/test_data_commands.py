"""The data scripts as commands (``recsys-embed data ...``): packaging, running from another working directory,
order-independent splits and atomic output folders (refused without ``--overwrite``, none left by a failed run).

Real Frappe rows are read from ``../shared/data`` (skipped when absent); everything is written under ``tmp_path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from setuptools import find_packages

from data_scripts import criteo, frappe, movielens
from data_scripts._common import atomic_output, natural_key
from recsys_embed.cli import main as cli_main
from recsys_embed.data import CTRSchema, load_id_counts

ROOT = Path(__file__).resolve().parents[1]
SHARED_FRAPPE = ROOT.parent / "shared" / "data" / "frappe"
SPLITS = ("train", "val", "test")

# 30 Frappe-like rows: label, then 10 global ids (a few duplicate rows on purpose)
ROWS = [(1 if n % 3 == 0 else -1, [100 + n % 4, 200 + n % 7, *range(300, 307), 400 + n % 2]) for n in range(30)]


def _libfm(path: Path, rows: list[tuple[int, list[int]]]) -> Path:
    path.write_text("".join(" ".join([str(label), *(f"{i}:1" for i in ids)]) + "\n" for label, ids in rows))
    return path


def _criteo_day(path: Path, rows: int, offset: int) -> Path:
    """A tiny Criteo TSV day file: label, I1..I13, C1..C26 (C1 varies with the row)."""
    lines = []
    for n in range(rows):
        cats = [f"{offset + n % 5:08x}", *(["a1b2c3d4"] * 25)]
        lines.append("\t".join([str(n % 2), *([str(n)] * 13), *cats]) + "\n")
    path.write_text("".join(lines))
    return path


def _folder_content(folder: Path) -> dict[str, object]:
    """Every split's table, the schema and the id counts of a dataset folder (to compare two folders)."""
    schema = CTRSchema.load(folder)
    content: dict[str, object] = {split: pq.read_table(schema.split_path(folder, split)) for split in schema.splits}
    content["schema"] = (folder / "schema.json").read_text()
    content["counts"] = {k: v.tolist() for k, v in load_id_counts(folder).items()}
    return content


def _assert_same_folder(a: Path, b: Path) -> None:
    first, second = _folder_content(a), _folder_content(b)
    assert first.keys() == second.keys()
    for key in first:
        if key in SPLITS:
            assert first[key].equals(second[key]), key  # type: ignore[attr-defined]
        else:
            assert first[key] == second[key], key


def _env() -> dict[str, str]:
    """The subprocess environment: this checkout first on the path (the venv's editable install may point
    elsewhere), one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


# ------------------------------------------------------------------------------------------- commands, packaging


def test_data_scripts_is_an_installed_package() -> None:
    """pyproject's package discovery ships ``data_scripts`` (so ``recsys-embed data`` works after any install)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(ROOT), include=config["include"])
    assert "data_scripts" in packages and "recsys_embed" in packages
    assert not any(p.startswith("tests") for p in packages)


def test_data_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main(["data", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: recsys-embed data" in out
    for name in ("criteo", "frappe", "movielens", "avazu", "kdd12"):
        assert name in out
    with pytest.raises(SystemExit) as done:
        cli_main(["data", "frappe", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--overwrite" in out and "recsys-embed data frappe --input" in out


def test_data_command_runs_from_another_working_directory(tmp_path: Path) -> None:
    """``recsys-embed data frappe`` with relative paths from a folder outside the checkout; a second run into the
    same folder is refused with one error line naming the folder and --overwrite (replacing: see below)."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    _libfm(work / "a.libfm", ROWS[:20])
    _libfm(work / "b.libfm", ROWS[20:])
    command = [sys.executable, "-m", "recsys_embed.cli", "data", "frappe", "--input", "a.libfm", "b.libfm"]
    command += ["--output", "data/frappe"]
    done = subprocess.run(command, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert CTRSchema.load(work / "data" / "frappe").rows == {"train": 21, "val": 6, "test": 3}

    again = subprocess.run(command, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 1
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Output folder data/frappe already exists") and "--overwrite" in last
    assert "Traceback" not in again.stderr

    assert sorted(p.name for p in (work / "data").iterdir()) == ["frappe"]  # no staging folder left


# ------------------------------------------------------------------------------------------ order independence


def test_frappe_split_does_not_depend_on_file_order_shared_rows(tmp_path: Path) -> None:
    files = [SHARED_FRAPPE / "frappe.validation.libfm", SHARED_FRAPPE / "frappe.test.libfm"]
    if not all(f.is_file() for f in files):
        pytest.skip(f"{SHARED_FRAPPE} is absent: the real sample data lives in ../shared/data beside the repository")
    first = frappe.prepare_frappe(tmp_path / "given", inputs=files, seed=0)
    frappe.prepare_frappe(tmp_path / "reversed", inputs=files[::-1], seed=0)
    _assert_same_folder(tmp_path / "given", tmp_path / "reversed")
    assert first.rows == {"train": 60607, "val": 17317, "test": 8658}
    assert first.source["inputs"] == ["frappe.test.libfm", "frappe.validation.libfm"]
    # the splits are a shuffle: both releases in each split, labels near the 0.33 positive rate
    train = pq.read_table(tmp_path / "given" / "train.parquet")["label"].to_numpy()
    assert abs(train.mean() - 0.33) < 0.01


def test_frappe_split_depends_only_on_the_rows(tmp_path: Path) -> None:
    """Two files in either order, or the same rows in one shuffled file, give identical folders; the seed matters."""
    a = _libfm(tmp_path / "a.libfm", ROWS[:12])
    b = _libfm(tmp_path / "b.libfm", ROWS[12:])
    shuffled = [ROWS[i] for i in np.random.default_rng(7).permutation(len(ROWS))]
    one = _libfm(tmp_path / "all.libfm", shuffled)
    for name, inputs in [("ab", [a, b]), ("ba", [b, a]), ("one", [one])]:
        frappe.prepare_frappe(tmp_path / name, inputs=inputs, seed=3)
    _assert_same_folder(tmp_path / "ab", tmp_path / "ba")
    for split in SPLITS:
        assert pq.read_table(tmp_path / "ab" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "one" / f"{split}.parquet")
        )
    frappe.prepare_frappe(tmp_path / "seed4", inputs=[a, b], seed=4)
    assert not pq.read_table(tmp_path / "seed4" / "train.parquet").equals(
        pq.read_table(tmp_path / "ab" / "train.parquet")
    )


def test_criteo_day_files_are_put_in_day_order(tmp_path: Path) -> None:
    """``--days`` in any order (a shell glob puts day_10 before day_2) gives the same folder, last day val/test."""
    days = [_criteo_day(tmp_path / f"day_{d}", 6, offset=10 * d) for d in (1, 2, 10)]
    assert sorted(days, key=natural_key) == days
    for name, order in [("sorted", days), ("glob", [days[0], days[2], days[1]]), ("reversed", days[::-1])]:
        criteo.prepare_criteo(order, tmp_path / name, layout="days", min_count=1)
    _assert_same_folder(tmp_path / "sorted", tmp_path / "glob")
    _assert_same_folder(tmp_path / "sorted", tmp_path / "reversed")
    schema = CTRSchema.load(tmp_path / "sorted")
    assert schema.source["inputs"] == ["day_1", "day_2", "day_10"]
    assert schema.rows == {"train": 12, "val": 3, "test": 3}


# ----------------------------------------------------------------------------------------------- atomic output


def _failing_runs(tmp_path: Path) -> dict[str, object]:
    bad_libfm = _libfm(tmp_path / "bad.libfm", ROWS)
    bad_libfm.write_text(bad_libfm.read_text() + "2 1:1 2:1\n")
    bad_criteo = _criteo_day(tmp_path / "train.txt", 20, offset=0)
    bad_criteo.write_text(bad_criteo.read_text() + "x\t1\n")
    (tmp_path / "not_movielens").mkdir()
    return {
        "frappe": lambda out: frappe.prepare_frappe(out, inputs=[bad_libfm]),
        "criteo": lambda out: criteo.prepare_criteo([bad_criteo], out),
        "movielens": lambda out: movielens.prepare_movielens(tmp_path / "not_movielens", out),
    }


@pytest.mark.parametrize("script", ["frappe", "criteo", "movielens"])
def test_a_failed_run_leaves_no_output(tmp_path: Path, script: str) -> None:
    run = _failing_runs(tmp_path)[script]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError):
        run(tmp_path / "new" / "nested" / "out")  # type: ignore[operator]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging, no created parents


def test_overwrite_is_refused_then_replaces(tmp_path: Path) -> None:
    source = _libfm(tmp_path / "all.libfm", ROWS)
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is fine without --overwrite
    frappe.prepare_frappe(out, inputs=[source], seed=1)
    before = _folder_content(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--overwrite") as refused:
        frappe.prepare_frappe(out, inputs=[source], seed=2)
    assert str(out) in str(refused.value)
    assert (out / "notes.txt").is_file() and _folder_content(out)["schema"] == before["schema"]  # untouched
    with pytest.raises(ValueError, match="holds the input"):
        frappe.prepare_frappe(tmp_path, inputs=[source], overwrite=True)
    frappe.prepare_frappe(out, inputs=[source], seed=2, overwrite=True)
    assert not (out / "notes.txt").exists()  # replaced, not merged
    assert "seed 2" in CTRSchema.load(out).source["split"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.libfm", "out"]


def test_atomic_output_interrupted_leaves_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        with atomic_output(tmp_path / "file", overwrite=True):
            pass


def test_atomic_output_with_a_trailing_slash_and_relative_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with atomic_output("../new/") as staging:
        (staging / "x.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "work"]
    assert (tmp_path / "new" / "x.txt").read_text() == "x"

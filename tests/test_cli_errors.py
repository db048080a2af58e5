"""What a user sees in the console: one ``error:`` line (exit status 2) per user error, a traceback with
``--debug`` (or ``RECSYS_EMBED_DEBUG=1``), and ``--help`` without library noise. Each case is a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_embed.data import SyntheticConfig, synthetic_dataset
from tests.test_cli import CONFIG, TINY

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120

#: case -> (arguments, a part of the one error line)
USER_ERRORS: dict[str, tuple[list[str], str]] = {
    "budget too small": (
        ["fit", "--config", CONFIG, *TINY, "--model.embedding.method=qr", "--model.embedding.budget.ratio=1000"],
        "Method 'qr' cannot fit",
    ),
    "budget out of range": (  # jsonargparse wraps it in "Does not validate against any of the Union subtypes"
        ["fit", "--config", CONFIG, *TINY, "--model.embedding.method=hash", "--model.embedding.budget.ratio=-1"],
        "Budget ratio must be >= 1 (got -1.0)",
    ),
    "unknown method": (
        ["fit", "--config", CONFIG, *TINY, "--model.embedding.method=nope"],
        "Unknown embedding method 'nope'; registered methods: [",
    ),
    "method option typo": (
        ["fit", "--config", CONFIG, *TINY, "--model.embedding.method=hash", "--model.embedding.options={rowz: 3}"],
        "no option(s) ['rowz']",
    ),
    "command-line option typo": (
        ["fit", "--config", CONFIG, "--trainer.max_stpes=3"],
        "unrecognized arguments: --trainer.max_stpes=3; did you mean --trainer.max_steps? (see recsys-embed fit",
    ),
    "option of the wrong type": (
        ["fit", "--config", CONFIG, "--trainer.max_steps=abc"],
        "Parser key \"trainer.max_steps\": Expected a <class 'int'>. Got value: abc",
    ),
    "missing data_dir": (
        ["fit", "--config", CONFIG, "--data.data_dir=no/such/folder"],
        "No schema.json in no/such/folder",
    ),
    "unknown stage": (
        ["fit", "--config", CONFIG, *TINY, "--stage=nope"],
        "--stage 'nope' is not a stage of method 'full': use one of ['train']",
    ),
    "bad sweep spec": (["bench", "--config", "no_such_sweep.yaml"], "Sweep spec 'no_such_sweep.yaml' does not exist"),
    "bench option typo": (["bench", "--shardd", "1/2"], "unrecognized arguments: --shardd"),
}


def recsys_embed(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``recsys-embed ARGS`` in a fresh process (this checkout's package, one thread)."""
    environment = {k: v for k, v in os.environ.items() if k != "RECSYS_EMBED_DEBUG"}
    environment.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "recsys_embed.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.fixture
def tiny_data() -> Path:
    """The synthetic data ``TINY`` describes, generated here (once, in the test cache) rather than with a
    progress bar inside the checked process."""
    return synthetic_dataset(
        SyntheticConfig(train_rows=3000, val_rows=1000, test_rows=1000, num_sparse=4, max_cardinality=1000)
    )


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line(case: str, tmp_path: Path, tiny_data: Path) -> None:
    args, message = USER_ERRORS[case]
    result = recsys_embed(args, tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert message in lines[0]
    assert not list(tmp_path.glob("runs/**/checkpoints/*.ckpt"))


@pytest.mark.parametrize(("case", "how"), [("budget out of range", "--debug"), ("command-line option typo", "env")])
def test_debug_shows_the_traceback(case: str, how: str, tmp_path: Path) -> None:
    args, message = USER_ERRORS[case]
    if how == "--debug":
        result = recsys_embed([*args, "--debug"], tmp_path)
    else:
        result = recsys_embed(args, tmp_path, RECSYS_EMBED_DEBUG="1")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and message.split(" (see")[0] in result.stderr


#: lines every command printed before (Lightning, torch, torchrec)
NOISE = (
    "args parameter is intended to run from within Python",
    "is_fx_tracing",
    "LeafSpec",
    "`__len__` defined",
    "litlogger",
    "Tip:",
)


def test_help_is_quiet_and_compact(tmp_path: Path) -> None:
    top = recsys_embed(["--help"], tmp_path)
    fit = recsys_embed(["fit", "--help"], tmp_path)
    for result in (top, fit):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.strip() == ""
        assert not [noise for noise in NOISE if noise in result.stdout]
    assert all(f"\n    {command} " in top.stdout for command in ("fit", "bench", "methods", "data"))  # listed
    help_lines = fit.stdout.splitlines()
    assert len(help_lines) < 650  # 1,304 before: every nn.Module subclass was listed, and the usage twice
    assert "--model.embedding.method" in fit.stdout and "--trainer.max_steps" in fit.stdout
    assert "recsys_embed.models.DLRM" in fit.stdout and "torch.ao.nn" not in fit.stdout


def test_a_fit_prints_none_of_the_library_noise(tmp_path: Path, tiny_data: Path) -> None:
    steps = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1"]
    result = recsys_embed(["fit", "--config", CONFIG, *TINY, *steps], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [noise for noise in NOISE if noise in result.stderr + result.stdout], result.stderr[-3000:]

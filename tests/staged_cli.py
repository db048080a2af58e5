"""What the staged methods' CLI tests share: a short `recsys-embed fit` into a folder, its stages' state, a kill."""

from __future__ import annotations

import json
from pathlib import Path

from recsys_embed.cli import main
from tests.test_cli import TINY


class Killed(Exception):
    """A simulated kill."""


def staged_fit(config: str, folder: Path, *extra: str) -> int | None:
    """``fit`` of ``config`` on the tiny data: run folder ``folder/run``, logs in ``folder``, a checkpoint every 3
    steps (the resume points inside a stage), ``extra`` last."""
    return main(
        [
            "fit",
            "--config",
            config,
            *TINY,
            f"--trainer.default_root_dir={folder / 'run'}",
            f"--trainer.logger.init_args.save_dir={folder}",
            "--trainer.callbacks.init_args.every_n_train_steps=3",
            "--trainer.log_every_n_steps=1",
            *extra,
        ]
    )


def stage_state(folder: Path) -> dict:
    """The run's ``stages/state.json``."""
    return json.loads((folder / "run" / "stages" / "state.json").read_text())

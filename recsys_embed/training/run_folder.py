"""One fit run, one folder: the CSV metrics, the TensorBoard events, the saved ``config.yaml`` and the checkpoints.

Lightning's file loggers each pick "the next free ``version_N``" under their root on their own, so a CSV and a
TensorBoard logger with the same ``save_dir`` end up in two folders (the first one creates ``version_0``, the
second then sees it and takes ``version_1``). The checkpoints and the config follow the first logger only. Giving
every such logger the first one's version puts the whole run in one folder::

    runs/criteo_dcn/lightning_logs/version_3/
        metrics.csv  hparams.yaml  events.out.tfevents.*  config.yaml  checkpoints/last.ckpt

Example::

    loggers = [CSVLogger("runs/x"), TensorBoardLogger("runs/x")]
    share_run_folder(loggers)
    assert loggers[0].log_dir == loggers[1].log_dir  # runs/x/lightning_logs/version_N
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

FILE_LOGGERS = (CSVLogger, TensorBoardLogger)


def share_run_folder(loggers: Sequence[Logger]) -> None:
    """Give every CSV/TensorBoard logger that would pick its own next version under the same root folder as the
    first of them (same ``save_dir`` and ``name``) that logger's version. Loggers with an explicit ``version`` or
    another root keep theirs."""
    file_loggers = [logger for logger in loggers if isinstance(logger, FILE_LOGGERS)]
    if len(file_loggers) < 2:
        return
    first, *others = file_loggers
    root = os.path.abspath(first.root_dir)
    for other in others:
        # Lightning keeps a logger's version in ``_version`` (None: the next free one, found on first use) and
        # has no setter; both classes read it the same way, and tests/test_cli.py checks the resulting folder.
        if other._version is None and os.path.abspath(other.root_dir) == root:
            other._version = first.version

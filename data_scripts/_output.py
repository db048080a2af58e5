"""Atomic dataset folders: a script writes into a staging sibling that is renamed into place only on success.

A non-empty output folder is refused unless ``--overwrite`` is given, a folder holding an input is always refused,
and a failed or interrupted run leaves nothing behind (only a SIGKILL can leave a staging folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
OVERWRITE_FLAG = "--overwrite"


def check_output(folder: str | Path, *, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an output ``folder`` that cannot be written: a file, a non-empty folder without ``overwrite``, or a
    folder holding one of the ``inputs`` (replacing it would delete the source). Returns ``folder`` as a Path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Output {folder} exists and is not a folder; choose another --output.")
    target = folder.resolve()
    for source in inputs:
        resolved = Path(source).resolve()
        if resolved == target or target in resolved.parents:
            raise ValueError(f"Output folder {folder} holds the input {source}; choose another --output.")
    if not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(
            f"Output folder {folder} already exists and is not empty; rerun with {OVERWRITE_FLAG} to replace it, "
            "or choose another --output."
        )
    return folder


@contextmanager
def atomic_output(folder: str | Path, *, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Write a dataset folder atomically: yield a fresh staging folder beside ``folder`` and rename it to ``folder``
    when the block succeeds.

    The checks of :func:`check_output` run first (before any work). On any error (or interrupt) the staging folder
    is deleted, and so are parent folders this call created, so a failed run leaves no output. On success an
    existing ``folder`` (empty, or any with ``overwrite``) is replaced. The staging folder is a hidden sibling,
    ``.<name>.tmp-<random>``, so the final rename stays on one file system; only a killed process (SIGKILL) leaves
    one behind.
    """
    check_output(folder, overwrite=overwrite, inputs=inputs)
    final = Path(os.path.abspath(folder))  # "out/", "." and ".." spelled out, so the sibling is beside the folder
    created = [p for p in final.parents if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        _replace(staging, final, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    log.info("Wrote %s", folder)


def _replace(staging: Path, final: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``final``; an existing ``final`` is moved aside first and deleted after the rename."""
    check_output(final, overwrite=overwrite)  # it may have appeared while the script ran
    if not final.exists():
        staging.rename(final)
        return
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
    final.rename(old)
    try:
        staging.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old)

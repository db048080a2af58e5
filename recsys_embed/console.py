"""What the ``recsys-embed`` console shows: one line per user error, no library noise, compact ``--help``.

* :func:`user_error_message` tells a user error (a ``ValueError``, a Lightning misconfiguration, a command-line
  usage error) from an internal bug, and gives the one line to print: the innermost ``ValueError`` inside
  jsonargparse's wrappers (a budget error comes wrapped in "Does not validate against any of the Union subtypes").
* :func:`quiet_library_noise` silences, by exact message, the warnings and log lines of our dependencies that say
  nothing to a user of this CLI (each one is listed with why it is safe to drop).
* :class:`HeldLogs` holds the info lines logged while a command sets up, so that a setup error prints its one line
  alone; they are printed as soon as the command starts its real work.
* :class:`CompactHelpFormatter` shortens jsonargparse's "known subclasses" lists (every ``nn.Module`` subclass
  torch and torchrec define: ~600 lines of ``fit --help``).
* :class:`UsageErrorParser`: an ``argparse`` parser whose usage errors raise :class:`UsageError` (one line)
  instead of printing the whole usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from jsonargparse import DefaultHelpFormatter

#: environment variable that, like ``--debug``, shows the full traceback of a user error
DEBUG_ENV = "RECSYS_EMBED_DEBUG"
PACKAGE_DIR = Path(__file__).resolve().parent

#: (message regex, why it is safe to drop) of Python warnings our dependencies raise on every command
QUIET_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"LightningCLI's args parameter is intended to run from within Python",
        "our entry point parses sys.argv itself (it removes --debug) and passes the rest as args",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "inside Lightning's pytree helper, under this torch version; nothing for a user to change",
    ),
)
#: (logger name, message regex) of log lines our dependencies print on every run
QUIET_LOGS: tuple[tuple[str, str], ...] = (
    # torch warns (once per process) when anything calls is_fx_tracing(); torchrec's modules do, in every forward
    ("torch.fx._symbolic_trace", r"^is_fx_tracing will return true for both"),
    # Lightning advertises its cloud logger whenever a Trainer has loggers
    ("lightning.pytorch.utilities.rank_zero", r"Tip: For seamless cloud logging"),
    ("lightning.fabric.utilities.rank_zero", r"Tip: For seamless cloud logging"),
)
#: Lightning's warning for any IterableDataset with a ``__len__`` (exact while data.num_workers <= 1)
ITERABLE_LEN_WARNING = r"Your `IterableDataset` has `__len__` defined"


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted, not when it was built: a
    caller (pytest's capture, a redirect) may replace and close the stream between calls of ``main``."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it; always read sys.stderr instead
        pass


def package_logger() -> logging.Logger:
    """The ``recsys_embed`` logger, printing INFO and up once on the current stderr (not through the root logger,
    which torchrec's import may configure too)."""
    log = logging.getLogger("recsys_embed")
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        log.addHandler(_CurrentStderr())
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


class UsageError(Exception):
    """A command-line usage error (unknown option, bad value) to show as one line."""


class UsageErrorParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors raise :class:`UsageError` (``--help`` still prints)."""

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        raise UsageError(f"{message} (see {self.prog} --help)")


class _DropMessages(logging.Filter):
    """Drop log records whose message matches one of the given regexes."""

    def __init__(self) -> None:
        super().__init__()
        self.patterns: list[re.Pattern[str]] = []

    def add(self, pattern: str) -> None:
        if all(p.pattern != pattern for p in self.patterns):
            self.patterns.append(re.compile(pattern))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


_DROPPED: dict[str, _DropMessages] = {}


def quiet_library_noise() -> None:
    """Install the targeted filters of :data:`QUIET_WARNINGS` and :data:`QUIET_LOGS` (idempotent)."""
    for pattern, _why in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, pattern in QUIET_LOGS:
        drop = _DROPPED.setdefault(name, _DropMessages())
        drop.add(pattern)
        logging.getLogger(name).addFilter(drop)


def quiet_iterable_length_warning() -> None:
    """Drop Lightning's ``IterableDataset`` ``__len__`` warning: call only where loaders have at most one worker
    (then our datasets' lengths are exact)."""
    warnings.filterwarnings("ignore", message=ITERABLE_LEN_WARNING)


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` is among ``argv`` or :data:`DEBUG_ENV` is set, and ``argv`` without ``--debug``."""
    rest = [a for a in argv if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in {"", "0", "false", "no"}
    return env or len(rest) != len(argv), rest


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or during, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _raised_in_package(error: BaseException) -> bool:
    """Whether ``error`` was raised by code of this package (its innermost frame is ours)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def user_error_message(error: BaseException) -> str | None:
    """The one line a user error shows (without the ``error:`` prefix); ``None`` for an internal bug.

    User errors are ``ValueError`` s (ours, and those the libraries raise for bad values), Lightning's
    ``MisconfigurationException`` and command-line usage errors; of a ``ValueError`` chain (jsonargparse wraps
    the errors of ``Union`` members and of instantiation) the innermost ``ValueError`` raised by this package is
    shown, else the innermost ``ValueError``. Usage errors show their own message.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    chain = list(_chain(error))
    ours = [e for e in chain if isinstance(e, ValueError) and _raised_in_package(e)]
    if isinstance(error, (UsageError, argparse.ArgumentError)):
        return _one_line(str(ours[-1]) if ours else str(error))
    if isinstance(error, (ValueError, MisconfigurationException)):
        values = [e for e in chain if isinstance(e, (ValueError, MisconfigurationException))]
        return _one_line(str((ours or values)[-1]))
    return None


class HeldLogs(logging.Filter):
    """Hold back the INFO (and lower) records the package's, Lightning's and the root handlers would print.

    :meth:`release` prints them (in order) and lets later records through; :meth:`discard` drops them (a setup
    that ended in a user error: its one line is all a user needs). Warnings and errors are never held.
    """

    LOGGERS = ("", "lightning", "lightning.pytorch", "lightning.fabric", "recsys_embed")

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[logging.Handler, logging.LogRecord]] = []
        self.handlers: list[logging.Handler] = []
        self._holding = False

    def __enter__(self) -> HeldLogs:
        found = (h for name in self.LOGGERS for h in logging.getLogger(name).handlers)
        self.handlers = list(dict.fromkeys(found))
        for handler in self.handlers:
            handler.addFilter(_HoldFor(self, handler))
        self._holding = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
        for handler in self.handlers:
            for held in [f for f in handler.filters if isinstance(f, _HoldFor) and f.owner is self]:
                handler.removeFilter(held)

    def hold(self, handler: logging.Handler, record: logging.LogRecord) -> bool:
        """Whether ``record`` may pass ``handler`` now (``False``: it is held)."""
        if not self._holding or record.levelno > logging.INFO:
            return True
        self.records.append((handler, record))
        return False

    def release(self) -> None:
        """Print the held records and stop holding."""
        self._holding = False
        records, self.records = self.records, []
        for handler, record in records:
            handler.handle(record)

    def discard(self) -> None:
        """Drop the held records and stop holding."""
        self._holding = False
        self.records = []


class _HoldFor(logging.Filter):
    """The per-handler filter of a :class:`HeldLogs`."""

    def __init__(self, owner: HeldLogs, handler: logging.Handler) -> None:
        super().__init__()
        self.owner, self.handler = owner, handler

    def filter(self, record: logging.LogRecord) -> bool:
        return self.owner.hold(self.handler, record)


class CompactHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with lists of "known subclasses" longer than :attr:`MAX_LISTED` cut to a count (the
    option's ``--KEY.help CLASS`` shows any one class's options)."""

    MAX_LISTED = 12

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        head, found, listed = text.partition(", known subclasses: ")
        if not found:
            return text
        names = [n.strip() for n in listed.rstrip(")").split(",") if n.strip()]
        if len(names) <= self.MAX_LISTED:
            return text
        closing = ")" if listed.rstrip().endswith(")") else ""
        ours = [n for n in names if n.startswith(f"{__package__}.models.")]  # a model option lists our models
        ours = (ours or [n for n in names if n.startswith(f"{__package__}.")])[: self.MAX_LISTED]
        if not ours:
            return f"{head}, any of {len(names)} known subclasses{closing}"
        return f"{head}, known subclasses: {', '.join(ours)} and {len(names) - len(ours)} more{closing}"

"""``recsys-embed data``: the data scripts as subcommands, one per public dataset.

``recsys-embed data criteo|frappe|movielens ...`` (also ``python -m data_scripts ...``) turns a downloaded public
release into a CTR dataset folder (``train/val/test.parquet``, ``schema.json``, ``id_counts.npz``). Every command
writes its folder atomically and refuses to replace a non-empty one without ``--overwrite``. A user error (a
missing or malformed input, a refused output) ends with one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from types import ModuleType

from data_scripts import avazu, criteo, frappe, graph, kdd12, movielens
from data_scripts._common import setup_logging

log = logging.getLogger(__name__)

COMMANDS: dict[str, ModuleType] = {
    "criteo": criteo,
    "frappe": frappe,
    "movielens": movielens,
    "avazu": avazu,
    "kdd12": kdd12,
    "graph": graph,
}
"""Subcommand name -> script module (each has ``SUMMARY``, ``EXAMPLES``, ``add_arguments`` and ``run``)."""


def build_parser(prog: str = "recsys-embed data") -> argparse.ArgumentParser:
    """The ``recsys-embed data`` parser, one subparser per script."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Turn a downloaded public dataset into a CTR dataset folder (train/val/test.parquet, "
        "schema.json, id_counts.npz) for --data.data_dir. The licences forbid redistribution: download the data "
        "yourself.",
        epilog=f"Run '{prog} COMMAND --help' for a command's options and rules; each output folder is written "
        "atomically, and an existing non-empty one is replaced only with --overwrite.",
    )
    commands = parser.add_subparsers(dest="command", required=True, title="commands")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=module.SUMMARY,
            description=(module.__doc__ or module.SUMMARY).split("\n\n")[0],
            epilog=module.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "recsys-embed data") -> int:
    """Parse ``argv`` (without the leading ``data``), run the chosen script; a ``ValueError`` is one line."""
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0

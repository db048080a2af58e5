"""``recsys-embed methods``: every registered method with its idea, memory formula, options, budget knobs, stages
and the compression ratios it can reach on given tables, read from the code (docstrings, signatures, solvers).

The README's methods table is this command's ``--markdown`` output on the default synthetic tables (a test keeps
them equal). Ratio ranges come from the methods' own budget solvers, run on the ``meta`` device (no memory): the
smallest ratio is what ``Budget(ratio=1)`` reaches, the largest is found by bisection on a byte budget.

Example::

    recsys-embed methods                         # all methods, on the default synthetic tables (dim 16)
    recsys-embed methods qr --data_dir data/frappe --embedding_dim 16
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torchrec import EmbeddingBagConfig

from recsys_embed.console import UsageErrorParser
from recsys_embed.methods import Budget, EmbeddingMethod, available_methods, full_bytes, method_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptionInfo:
    """One keyword option of a method: its type, its default (None when required) and whether a budget sets it."""

    name: str
    type: str
    default: str | None
    budget_knob: bool


@dataclass(frozen=True)
class MethodInfo:
    name: str
    version: int
    idea: str
    memory: str
    paper: str
    options: list[OptionInfo]
    stages: list[str]
    ratios: tuple[float, float] | None  # smallest and largest reachable ratio on the tables asked for
    why_not: str  # why no ratio is reachable (empty when some is)


def _docstring_parts(cls: type[EmbeddingMethod]) -> tuple[str, str, str]:
    """From the method's module docstring: the idea (first line), the memory formula (the ``Memory:`` paragraph, up
    to "bytes") and the paper (the first "Author et al., Venue'YY" of the ``Idea (...)`` paragraph)."""
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    paragraphs = [p.replace("\n", " ") for p in doc.split("\n\n")]
    idea = re.sub(r"^``\w+``:\s*", "", paragraphs[0]).rstrip(".").replace("``", "`")
    memory = next((p for p in paragraphs if p.startswith("Memory:")), "")
    memory = memory.removeprefix("Memory:").split(" bytes")[0].strip().replace("``", "`")
    cited = next((p for p in paragraphs if p.startswith("Idea (")), "")
    paper = re.search(r"[A-Z][a-z]+ et al\., (?:[A-Z][A-Za-z]*'\d\d|arXiv \d+\.\d+)", cited)
    return idea, memory, paper.group(0) if paper else "-"


def _type_name(annotation: object) -> str:
    text = str(annotation).replace("typing.", "").replace("collections.abc.", "")
    return re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("torch.device", "device")


def options_of(cls: type[EmbeddingMethod]) -> list[OptionInfo]:
    hints = typing.get_type_hints(inspect.unwrap(cls.__init__))
    params = inspect.signature(cls.__init__).parameters.values()
    return [
        OptionInfo(
            name=p.name,
            type=_type_name(hints.get(p.name, "")),
            default=None if p.default is inspect.Parameter.empty else repr(p.default),
            budget_knob=p.name in cls.budget_knobs,
        )
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("device", "validate_ids")
    ]


def _build(name: str, tables: Sequence[EmbeddingBagConfig], budget: Budget) -> EmbeddingMethod:
    cls = method_class(name)
    options: dict[str, object] = {"device": "meta"}
    if cls.needs_id_counts:  # the reachable ratios do not depend on the counts themselves
        options["id_counts"] = {f: np.arange(t.num_embeddings, 0, -1) for t in tables for f in t.feature_names}
    return cls.from_budget(tables, budget, **options)


def reachable_ratios(name: str, tables: Sequence[EmbeddingBagConfig]) -> tuple[tuple[float, float] | None, str]:
    """The smallest and largest compression ratio the method's budget solver reaches on ``tables`` (or why none)."""
    full = full_bytes(tables)
    try:
        low = _build(name, tables, Budget(ratio=1)).compression_ratio()
    except ValueError as error:
        return None, str(error).split(". ")[0]
    fits, fails = full, 0  # bisection on bytes: the smallest budget the solver meets
    while fits - fails > max(1, fits // 2000):
        middle = (fits + fails) // 2
        try:
            _build(name, tables, Budget(bytes=middle))
            fits = middle
        except ValueError:
            fails = middle
    return (low, full / _build(name, tables, Budget(bytes=fits)).memory_bytes()), ""


def method_info(name: str, tables: Sequence[EmbeddingBagConfig]) -> MethodInfo:
    cls = method_class(name)
    idea, memory, paper = _docstring_parts(cls)
    ratios, why_not = reachable_ratios(name, tables)
    try:  # stages() may read the built form; a meta-device build costs no memory
        stages = [s.name for s in _build(name, tables, Budget(ratio=1)).stages()]
    except ValueError:
        stages = [s.name for s in cls.stages(cls.__new__(cls))]  # not buildable here: the class's own list
    return MethodInfo(name, cls.version, idea, memory, paper, options_of(cls), stages, ratios, why_not)


def _ratio_text(info: MethodInfo) -> str:
    if info.ratios is None:
        return f"none ({info.why_not})"
    low, high = info.ratios
    return (
        f"{low:.3g}x"
        if high / low < 1.01
        else f"{low:.3g}x - {high:,.0f}x"
        if high >= 100
        else f"{low:.3g}x - {high:.3g}x"
    )


def render_markdown(infos: Sequence[MethodInfo]) -> str:
    lines = [
        "| name | idea | memory (bytes) | budget knobs | reachable ratios | stages | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for info in infos:
        knobs = ", ".join(f"`{o.name}`" for o in info.options if o.budget_knob) or "-"
        lines.append(
            f"| `{info.name}` | {info.idea} | {info.memory} | {knobs} | {_ratio_text(info)} | "
            f"{', '.join(info.stages)} | {info.paper} |"
        )
    return "\n".join(lines)


def render_text(infos: Sequence[MethodInfo]) -> str:
    blocks = []
    for info in infos:
        lines = [
            f"{info.name} (version {info.version}): {info.idea} ({info.paper})",
            f"  memory: {info.memory}",
            f"  reachable ratios: {_ratio_text(info)}",
            f"  stages: {', '.join(info.stages)}",
            "  options:",
        ]
        for o in info.options:
            default = "required unless a budget is given" if o.default is None else f"default {o.default}"
            knob = ", solved by a budget" if o.budget_knob else ""
            lines.append(f"    {o.name}: {o.type} ({default}{knob})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def default_tables(embedding_dim: int = 16) -> list[EmbeddingBagConfig]:
    """The default synthetic dataset's 26 tables (10 to 1M ids), without generating the data."""
    from recsys_embed.data import SyntheticConfig
    from recsys_embed.training import tables_for

    cards = SyntheticConfig().cardinalities()
    return tables_for({f"cat_{i}": n for i, n in enumerate(cards)}, embedding_dim)


def main(argv: list[str] | None = None) -> int:
    parser = UsageErrorParser(
        prog="recsys-embed methods",
        description="Every registered compression method: idea, memory formula, options, budget knobs, stages and "
        "the compression ratios it reaches on the given tables.",
    )
    parser.add_argument("names", nargs="*", help=f"methods to show (default: all of {available_methods()})")
    parser.add_argument("--data_dir", help="a prepared dataset folder (schema.json): its tables (default: synthetic)")
    parser.add_argument("--embedding_dim", type=int, default=16, help="dim of every table (default 16)")
    parser.add_argument("--markdown", action="store_true", help="one markdown table (the README's)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in available_methods()]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; registered: {available_methods()}")
    if args.data_dir:
        from recsys_embed.data.schema import CTRSchema
        from recsys_embed.training import tables_for

        tables = tables_for(CTRSchema.load(args.data_dir).cardinalities, args.embedding_dim)
    else:
        tables = default_tables(args.embedding_dim)
    infos = [method_info(n, tables) for n in args.names or available_methods()]
    print(render_markdown(infos) if args.markdown else render_text(infos))  # noqa: T201 - a CLI's output
    return 0

"""The registry: every method class registered, every name builds, bad names/options/budgets fail clearly."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from torchrec import EmbeddingBagConfig

from recsys_embed.methods import Budget, EmbeddingMethod, available_methods, build_embedding, method_class
from recsys_embed.methods.low_precision import LowPrecisionMethod
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import RemapMethod
from tests.conftest import budget_for, make_tables, method_options


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_every_method_class_is_registered() -> None:
    registered = {method_class(n) for n in available_methods()}
    bases = {RemapMethod, LowPrecisionMethod}  # abstract bases of the library's methods, not methods themselves
    library = {c for c in _all_subclasses(EmbeddingMethod) if c.__module__.startswith("recsys_embed.")} - bases
    assert library <= registered
    assert {"full", "hash"} <= set(available_methods())


@pytest.mark.parametrize("name", available_methods())
def test_every_registered_name_builds_from_a_budget(name: str) -> None:
    tables = make_tables()
    emb = build_embedding(name, tables, budget=budget_for(name), **method_options(name, tables))
    assert isinstance(emb, EmbeddingMethod)
    assert emb.memory_bytes() <= budget_for(name).max_bytes(tables)


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown embedding method 'hsah'.*'hash'"):
        build_embedding("hsah", make_tables())


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['row'\].*'rows'"):
        build_embedding("hash", make_tables(), row=10)


def test_full_cannot_compress() -> None:
    with pytest.raises(ValueError, match="smallest reachable budget is ratio=1"):
        build_embedding("full", make_tables(), budget=Budget(ratio=2))


def test_budget_needs_exactly_one_of_ratio_or_bytes() -> None:
    with pytest.raises(ValueError, match="exactly one of ratio= or bytes="):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(ratio=2, bytes=100)
    with pytest.raises(ValueError, match=">= 1"):
        Budget(ratio=0.5)
    with pytest.raises(ValueError, match="positive"):
        Budget(bytes=0)


def test_budget_bytes_and_ratio() -> None:
    tables = make_tables((100,), dim=4)  # 1600 bytes
    assert Budget(ratio=4).max_bytes(tables) == 400
    assert Budget(bytes=123).max_bytes(tables) == 123


def test_name_registered_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("full")(type("Other", (EmbeddingMethod,), {}))


def test_bad_tables_are_rejected() -> None:
    tables = make_tables((10, 10))
    tables[1].name = tables[0].name
    with pytest.raises(ValueError, match="unique"):
        build_embedding("full", tables)
    with pytest.raises(ValueError, match="No tables"):
        build_embedding("full", [])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rows": "5k"}, r"option rows='5k' \(str\) must be int"),
        ({"rows": 10, "shared": "maybe"}, r"option shared='maybe' \(str\) must be bool"),
        ({"rows": True}, r"option rows=True \(bool\) must be int"),
        ({"rows": 10, "hash": "md5"}, r"option hash='md5' \(str\) must be one of 'splitmix64', 'identity'"),
        ({}, r"Method 'hash' needs rows= or a budget"),
    ],
)
def test_option_types_and_required_knobs_are_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_embedding("hash", make_tables(), **options)


def test_sequence_options_are_checked_element_by_element() -> None:
    assert build_embedding("qr", make_tables(), collisions=[2, 3, 4]).bases == [2, 3, 4]
    with pytest.raises(ValueError, match=r"collisions=\[2, 'a', 4\] \(list\) must be int or a sequence of int"):
        build_embedding("qr", make_tables(), collisions=[2, "a", 4])


def with_default(cls: type[EmbeddingMethod], option: str, value: object) -> type[EmbeddingMethod]:
    """A subclass of ``cls`` that differs only in the default of ``option`` (its signature says so too)."""

    def __init__(self: EmbeddingMethod, tables: Sequence[EmbeddingBagConfig], **options: Any) -> None:
        cls.__init__(self, tables, **{option: value, **options})

    signature = inspect.signature(cls.__init__)
    params = [p.replace(default=value) if p.name == option else p for p in signature.parameters.values()]
    __init__.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return type(f"{cls.__name__}_{option}", (cls,), {"__init__": __init__})


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("qr", "partitions", 3),
        ("qr", "operation", "add"),
        ("hash", "shared", True),
        ("multi_hash", "num_hashes", 8),  # seeds: 8 bytes per hash and table
        ("adapt", "hot_share", 0.2),
        ("unified", "chunk_dim", 4),
        ("tt_rec", "full_tables", []),  # every table TT: more tables share the bytes, a smaller rank
    ],
)
def test_budget_solvers_read_defaults_from_the_constructor(name: str, option: str, value: object) -> None:
    """Changing nothing but a constructor default changes what the budget solver plans for (no restated default)."""
    cls = method_class(name)
    changed = with_default(cls, option, value)
    assert cls.option_defaults()[option] != value and changed.option_defaults()[option] == value
    tables, budget = make_tables(), Budget(ratio=4)
    extra = method_options(name, tables)
    solved = changed.from_budget(tables, budget, **extra)
    assert solved.memory_bytes() <= budget.max_bytes(tables)
    expected = cls.from_budget(tables, budget, **extra, **{option: value})
    assert solved.config() == expected.config()
    assert solved.config() != cls.from_budget(tables, budget, **extra).config()


def test_the_readme_methods_table_is_the_generated_one() -> None:
    from recsys_embed.catalog import default_tables, method_info, render_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = render_markdown([method_info(n, default_tables()) for n in available_methods()])
    assert table in readme, "README's methods table is stale: regenerate it with `recsys-embed methods --markdown`"


def test_a_subclass_without_its_own_constructor_records_its_options() -> None:
    """config() is the options of the call the user made, whichever class's constructor ran."""
    from recsys_embed.methods.hashing import HashEmbedding

    class Inherited(HashEmbedding):
        pass

    emb = Inherited(make_tables(), rows=10, seed=3)
    assert emb.config()["rows"] == 10 and emb.config()["seed"] == 3
    assert Inherited.from_config(make_tables(), emb.config()).config() == emb.config()


@pytest.mark.parametrize("name", available_methods())
def test_a_ratio_that_leaves_no_byte_is_one_clear_error(name: str) -> None:
    tables = make_tables()
    with pytest.raises(ValueError, match=r"Budget ratio 1e\+06 leaves less than one byte"):
        build_embedding(name, tables, budget=Budget(ratio=1e6), **method_options(name, tables))

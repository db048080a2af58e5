"""The one registry of compression methods: name -> class, and :func:`build_embedding`."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

from torchrec import EmbeddingBagConfig

from recsys_embed.methods.base import Budget, EmbeddingMethod

_REGISTRY: dict[str, type[EmbeddingMethod]] = {}


def register(name: str) -> Callable[[type[EmbeddingMethod]], type[EmbeddingMethod]]:
    """Class decorator that registers a method under ``name``."""

    def decorate(cls: type[EmbeddingMethod]) -> type[EmbeddingMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"Method name {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[EmbeddingMethod]:
    """The class registered under ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown embedding method {name!r}; registered methods: {available_methods()}.") from None


def method_options(name: str) -> list[str]:
    """The keyword options a method accepts (besides ``tables``)."""
    params = inspect.signature(method_class(name).__init__).parameters
    return [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_embedding(
    name: str,
    tables: Sequence[EmbeddingBagConfig],
    *,
    budget: Budget | None = None,
    **options: object,
) -> EmbeddingMethod:
    """Build the registered method ``name`` over ``tables``.

    With ``budget``, the method solves its own knob (rows, collisions, rank, ...) so that its stored bytes fit;
    without it, ``options`` give the knob directly. Unknown options raise a ``ValueError`` listing the valid ones.

    Example::

        emb = build_embedding("full", tables)
        emb = build_embedding("hash", tables, budget=Budget(ratio=10))
    """
    cls = method_class(name)
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Method {name!r} has no option(s) {unknown}; its options are {allowed}.")
    check_option_types(name, options)
    if budget is None:
        params = inspect.signature(cls.__init__).parameters
        missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in options]
        if missing:
            raise ValueError(
                f"Method {name!r} needs {'/'.join(missing)}= or a budget: e.g. budget=Budget(ratio=10) "
                f"(YAML: model.embedding.budget: {{ratio: 10}}) or options {{{missing[0]}: ...}}."
            )
        return cls(tables, **options)
    both = [knob for knob in cls.budget_knobs if knob in options]
    if both:
        given = "/".join(f"{knob}=" for knob in cls.budget_knobs)
        raise ValueError(f"Method {name!r}: give either {given} or budget=, not both (got {both}).")
    return cls.from_budget(tables, budget, **options)


def check_option_types(name: str, options: Mapping[str, object]) -> None:
    """Each option's value against the constructor's annotation (bool, int, float, str, Literal, None, sequences
    and unions of those); one clear ``ValueError`` naming the option, the value and the expected type."""
    hints = typing.get_type_hints(inspect.unwrap(method_class(name).__init__))
    for option, value in options.items():
        expected = hints.get(option)
        if expected is not None and not _matches(value, expected):
            raise ValueError(
                f"Method {name!r}: option {option}={value!r} ({type(value).__name__}) must be {_describe(expected)}; "
                f"`recsys-embed methods` lists the options of {name!r} with their types."
            )


def _matches(value: object, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any or expected is object:
        return True
    if origin is Union or type(expected).__name__ == "UnionType":
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (Sequence, list, tuple, typing.Sequence) or expected in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return not isinstance(expected, type) or isinstance(value, expected)


def _describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or type(expected).__name__ == "UnionType":
        return " or ".join(_describe(a) for a in args)
    if expected is type(None):
        return "None"
    if origin is not None and args:
        return f"a sequence of {_describe(args[0])}"
    return getattr(expected, "__name__", str(expected))

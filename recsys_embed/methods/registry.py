"""The one registry of compression methods: name -> class, and :func:`build_embedding`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

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
    if budget is None:
        return cls(tables, **options)
    both = [knob for knob in cls.budget_knobs if knob in options]
    if both:
        given = "/".join(f"{knob}=" for knob in cls.budget_knobs)
        raise ValueError(f"Method {name!r}: give either {given} or budget=, not both (got {both}).")
    return cls.from_budget(tables, budget, **options)

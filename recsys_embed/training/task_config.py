"""What builds a :class:`~recsys_embed.training.CTRTask` and what its checkpoints say about it.

:class:`EmbeddingSpec` (method, budget or options) and :func:`tables_for` build the task; a checkpoint's
``hyper_parameters["description"]`` (format :data:`DESCRIPTION_FORMAT`) holds the model as an importable class path
with its init args (:func:`describe_model_factory`, :func:`model_factory_from`) and the method's description, in
plain types only (``torch.load(weights_only=True)`` reads them; :func:`checkpoint_description` reads one without
the tensors).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagConfig

from recsys_embed.methods import Budget, ParameterGroup, SparseOptimizer
from recsys_embed.methods.saving import check_same_tables


@dataclass
class EmbeddingSpec:
    """Which compression method to build, and either its budget or its explicit options.

    Example (YAML)::

        embedding:
          method: hash
          budget: {ratio: 10}
    """

    method: str = "full"
    budget: Budget | None = None
    options: dict[str, Any] = field(default_factory=dict)


# Checkpoints store these in their hyperparameters; allow them for torch.load(weights_only=True) (Lightning's default).
torch.serialization.add_safe_globals([EmbeddingSpec, Budget, SparseOptimizer])


def tables_for(cardinalities: dict[str, int], embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One logical table ``t_{feature}`` per categorical feature."""
    return [
        EmbeddingBagConfig(name=f"t_{name}", num_embeddings=n, embedding_dim=embedding_dim, feature_names=[name])
        for name, n in cardinalities.items()
    ]


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


#: what a checkpoint's ``hyper_parameters["description"]`` holds
DESCRIPTION_FORMAT = "recsys_embed.ctr_task/1"
_PLAIN = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is made of types ``torch.load(weights_only=True)`` and YAML both take."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def describe_model_factory(factory: Callable[..., nn.Module]) -> dict[str, Any] | None:
    """``{"class": "package.module.Class", "init_args": {...}}`` for a model class, a ``functools.partial`` of one,
    or the factory LightningCLI builds from ``class_path``/``init_args``; ``None`` if it is none of these (or not
    importable, or its options are not plain values)."""
    cls, init_args = factory, {}
    if isinstance(factory, functools.partial):
        init_args = dict(factory.keywords)
        if isinstance(factory.func, type) and not factory.args:
            cls = factory.func
        elif factory.args and isinstance(factory.args[-1], type):  # jsonargparse: partial(instantiate, ..., cls)
            cls = factory.args[-1]
        else:
            return None
    if not isinstance(cls, type) or "<locals>" in cls.__qualname__ or not _is_plain(init_args):
        return None
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def model_factory_from(description: dict[str, Any]) -> Callable[..., nn.Module]:
    """The model factory a :func:`describe_model_factory` result stands for."""
    module, _, name = description["class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ValueError(
            f"The checkpoint's model class {description['class']!r} cannot be imported: install the package that "
            "defines it, or pass model= to load_from_checkpoint."
        ) from None
    return functools.partial(cls, **description["init_args"])


def checkpoint_description(path: str | Path) -> dict[str, Any] | None:
    """The ``description`` of a ``CTRTask`` checkpoint (model and method that built it), ``None`` if it has none
    (checkpoints written before descriptions existed). Memory-maps the file: tensors are not read."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap is not possible
        saved = torch.load(path, map_location="cpu", weights_only=True)
    description = saved.get("hyper_parameters", {}).get("description") if isinstance(saved, dict) else None
    return description if isinstance(description, dict) and description.get("format") == DESCRIPTION_FORMAT else None


def as_spec(value: EmbeddingSpec | dict[str, Any]) -> EmbeddingSpec:
    """An :class:`EmbeddingSpec` from itself or its dict form (checkpoints store the dict)."""
    if isinstance(value, EmbeddingSpec):
        return value
    budget = value.get("budget")
    return EmbeddingSpec(
        method=value.get("method", "full"),
        budget=Budget(**budget) if isinstance(budget, dict) else budget,
        options=dict(value.get("options") or {}),
    )


def as_sparse_optimizer(value: SparseOptimizer | dict[str, Any]) -> SparseOptimizer:
    return value if isinstance(value, SparseOptimizer) else SparseOptimizer(**value)


def normalized(value: Any) -> Any:
    """Tuples and lists alike (YAML and checkpoints keep them differently)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


#: optimizers a stage's parameter group may name
STAGE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}


def group_optimizer(group: ParameterGroup, method: str) -> torch.optim.Optimizer:
    """The optimizer a stage's parameter group asks for (one of :data:`STAGE_OPTIMIZERS`)."""
    cls = STAGE_OPTIMIZERS.get(group.optimizer.lower())
    if cls is None:
        raise ValueError(
            f"Parameter group {group.name!r} of method {method!r} asks for optimizer {group.optimizer!r}; known: "
            f"{sorted(STAGE_OPTIMIZERS)}."
        )
    return cls(group.params, lr=group.lr, **group.options)


def check_description(
    saved: dict[str, Any] | None,
    describe: Callable[[], dict[str, Any]],
    tables: list[EmbeddingBagConfig],
    reload_hint: str = "load it with CTRTask.load_from_checkpoint(path) (or recsys-embed test/validate --ckpt_path, "
    "which rebuild the checkpoint's form)",
) -> None:
    """Raise a clear error if a checkpoint's ``saved`` description (its tables, method form, model class) is not
    the one ``describe()`` gives for a task holding ``tables`` (``reload_hint``: how to load it instead); a
    checkpoint without one passes."""
    if saved is None:  # written before checkpoints described themselves
        return
    mine = describe()
    check_same_tables(saved["method"]["tables"], tables, "the checkpoint")
    keys = ("name", "version", "config", "stage")
    theirs = {k: saved["method"][k] for k in keys}
    ours = {k: mine["method"][k] for k in keys}
    if normalized(theirs) != normalized(ours):
        raise ValueError(
            f"The checkpoint was written by method {theirs}, this task holds {ours}: {reload_hint}, or build the "
            "task with the same method settings."
        )
    if saved.get("model") and mine["model"] and saved["model"]["class"] != mine["model"]["class"]:
        raise ValueError(
            f"The checkpoint was written by model {saved['model']['class']}, this task holds "
            f"{mine['model']['class']}: {reload_hint}, or build the task with the same model."
        )

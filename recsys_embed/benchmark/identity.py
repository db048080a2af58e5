"""What makes a benchmark result what it is: a cell's identity, its data's fingerprint, its solver's version.

Two results may be pooled (averaged as seeds of one setting) only when everything that changes a result is equal.
A cell's id is therefore a hash of a canonical JSON of all of it: the training settings with every default filled
in (optimizer defaults too), the model class and its options with the constructor's defaults, the method name,
class version and options with defaults, the budget, the seed, the data (:func:`data_fingerprint` for a prepared
folder, the full generator config for synthetic data) and the ``recsys_embed`` version. The report pools rows whose
identities differ only in the seed (:data:`POOLED_OVER`).

An ``infeasible`` verdict comes from a method's budget solver, so it holds for one :func:`solver_version` only:
the method's class version and a hash of the source of the method and its solver helpers. A re-run checks an
infeasible cell again when that version changes.

Example::

    data_fingerprint("data/criteo_kaggle")      # '3f9c...' (schema.json + every file's name, size, edges)
    stable_hash({"b": 1, "a": [1, 2]})          # the same 16 hex digits in every process and version
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_embed.data.schema import SCHEMA_FILE
from recsys_embed.methods import SparseOptimizer, method_class, solvers
from recsys_embed.methods.base import EmbeddingMethod

#: bumped when what a cell id covers changes (rows of older formats are never pooled with newer ones)
IDENTITY_FORMAT = 2
#: the one setting a report averages over
POOLED_OVER = "seed"
#: bytes read from each end of a data file for its fingerprint (parquet keeps its metadata in the footer)
EDGE_BYTES = 1 << 16
#: dataset names the ``recsys-embed data`` command prepares
DATA_COMMANDS = ("criteo", "frappe", "movielens")


def plain(value: Any) -> Any:
    """A JSON-able form of ``value`` (tensors and arrays as lists, classes and functions by qualified name)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, type) or callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return str(value)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: equal settings give equal text."""
    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"))


def stable_hash(value: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def keyword_defaults(function: Any) -> dict[str, Any]:
    """The keyword options of ``function`` that have defaults, with those defaults (read from its signature)."""
    params = inspect.signature(function).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not inspect.Parameter.empty
    }


def model_options(model: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a model class is built with: its constructor's keyword defaults overridden by ``options``."""
    return plain({**keyword_defaults(model.__init__), **options})


def method_options(name: str, options: Mapping[str, Any], reserved: frozenset[str]) -> dict[str, Any]:
    """A method's options with its defaults, minus runner-set ones and the budget knobs its solver sets itself."""
    cls = method_class(name)
    solved = set(cls.budget_knobs) - set(options)
    resolved = cls.with_defaults(options)
    return plain({k: v for k, v in resolved.items() if k not in reserved and k not in solved})


def import_class(path: str) -> Any:
    """``"torch.optim.Adam"`` -> the class; a ``ValueError`` naming the path when it does not import."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"Sweep spec: training.optimizer.class_path {path!r} does not import; give a dotted class path such "
            "as torch.optim.Adam."
        ) from None


def optimizer_settings(optimizer: Mapping[str, Any]) -> dict[str, Any]:
    """The dense optimizer's class path and init args with the class's defaults filled in."""
    cls = import_class(str(optimizer["class_path"]))
    defaults = {k: v for k, v in keyword_defaults(cls.__init__).items() if k != "params"}
    return plain({"class_path": optimizer["class_path"], "init_args": {**defaults, **optimizer.get("init_args", {})}})


def data_fingerprint(data_dir: str | Path, dataset: str) -> str:
    """A hash of a dataset folder: ``schema.json``'s bytes, and every file's name, size and first/last 64 KiB.

    Cheap for any size (parquet files end with their row-group statistics), and the same for a copy of the folder
    on another machine. A missing folder or one without ``schema.json`` is a ``ValueError`` saying how to make it.
    """
    folder = Path(data_dir)
    if not (folder / SCHEMA_FILE).is_file():
        command = dataset if dataset in DATA_COMMANDS else "{" + ",".join(DATA_COMMANDS) + "}"
        problem = "does not exist" if not folder.exists() else f"has no {SCHEMA_FILE} (not a prepared dataset)"
        raise ValueError(
            f"Sweep spec: dataset {dataset!r} has data_dir {str(folder)!r}, which {problem} (relative paths are "
            f"read from {Path.cwd()}); prepare it first with `recsys-embed data {command} ... --output {folder}` "
            "(see `recsys-embed data --help`), or fix data_dir."
        )
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(EDGE_BYTES))
            if size > EDGE_BYTES:
                handle.seek(max(EDGE_BYTES, size - EDGE_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _source_files(cls: type) -> list[str]:
    """The files defining ``cls`` and the classes it inherits from in the project, and the solver helpers."""
    files = {inspect.getfile(solvers)}
    for klass in cls.__mro__[: cls.__mro__.index(EmbeddingMethod) + 1]:
        try:
            files.add(inspect.getfile(klass))
        except (OSError, TypeError):  # a class without a source file (built at run time)
            continue
    return sorted(files)


def solver_version(name: str) -> str:
    """``"v<class version>:<source hash>"``: what an ``infeasible`` verdict of method ``name`` holds for."""
    cls = method_class(name)
    digest = hashlib.sha256()
    for path in _source_files(cls):
        try:
            digest.update(Path(path).read_bytes())
        except OSError:
            digest.update(path.encode())
    return f"v{cls.version}:{digest.hexdigest()[:12]}"


def training_settings(training: Any, excluded: tuple[str, ...]) -> dict[str, Any]:
    """The resolved training settings of a cell (``excluded`` ones change logs, not results)."""
    settings = {k: v for k, v in dataclasses.asdict(training).items() if k not in excluded}
    settings["eval_batch_size"] = training.eval_batch_size or training.batch_size
    settings["sparse_optimizer"] = dataclasses.asdict(SparseOptimizer(**training.sparse_optimizer))
    settings["optimizer"] = optimizer_settings(training.optimizer)
    return plain(settings)

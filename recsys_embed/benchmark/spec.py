"""The sweep spec (YAML) and its grid: every method x budget x dataset x model x seed, as stable cells.

A spec names what to compare and how to train each cell; every cell is one ``CTRTask`` training run. Example::

    name: default
    methods:
      - all                                  # every registered method (new methods join with no change here)
      - {name: full, budgets: [1]}           # full tables cannot compress: only the reference ratio 1
      - {name: hash, label: hash_shared, options: {shared: true}}
    budgets: [4, 16, 64, 256]                # compression ratios against the full fp32 tables
    datasets:
      - {name: synthetic, synthetic: {train_rows: 300000, max_cardinality: 1000000}}
      - {name: criteo, data_dir: data/criteo_kaggle}
    models:
      - {name: DLRM, options: {bottom_mlp: [128, 64], top_mlp: [256, 128]}}
    seeds: [0, 1, 2]
    training: {embedding_dim: 16, batch_size: 4096, max_epochs: 1}
    quick:                                   # overrides applied by ``recsys-embed bench --quick``
      budgets: [4, 64]
      seeds: [0]

Unknown keys, methods, models, options and training settings are ``ValueError``s that list the valid names.
A cell's id hashes everything that changes its result (:mod:`recsys_embed.benchmark.identity`: settings with
defaults filled in, the data's fingerprint, the method's class version, the package version), so a changed setting
makes a new cell (never a stale reuse). A ``data_dir`` that is not a prepared dataset fails when the spec is read,
before any cell runs. ``--shard i/N`` takes the cells whose index in the id-sorted grid is ``i`` modulo ``N``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

import recsys_embed
from recsys_embed import models as model_zoo
from recsys_embed.benchmark import identity
from recsys_embed.data.synthetic import SyntheticConfig
from recsys_embed.methods import SparseOptimizer, available_methods, method_class, method_options

#: the budgets of the issue when a spec gives none
DEFAULT_BUDGETS: tuple[float, ...] = (2, 5, 10, 20, 50, 100, 1000)
#: method options the runner sets itself (never in a spec)
RESERVED_OPTIONS = frozenset({"id_counts", "device"})
#: the entry of ``methods`` that stands for every registered method
ALL_METHODS = "all"


def _check_keys(where: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"Sweep spec: unknown key(s) {unknown} in {where}; valid keys are {sorted(allowed)}.")


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"Sweep spec: {where} must be a mapping (got {type(value).__name__}: {value!r}).")
    return dict(value)


def _list(where: str, value: Any) -> list[Any]:
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _ratios(where: str, values: Any) -> tuple[float, ...]:
    ratios = []
    for value in _list(where, values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
            raise ValueError(f"Sweep spec: {where} must be compression ratios >= 1 (got {value!r}).")
        ratios.append(float(value))
    if not ratios or len(set(ratios)) != len(ratios):
        raise ValueError(f"Sweep spec: {where} must be a non-empty list of distinct ratios (got {values!r}).")
    return tuple(ratios)


@dataclass(frozen=True)
class MethodEntry:
    """One method of the sweep: a registered name, its options, an optional label and budgets of its own."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    budgets: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, raw: Any) -> MethodEntry:
        if isinstance(raw, str):
            raw = {"name": raw}
        where = f"methods entry {raw!r}"
        raw = _mapping(where, raw)
        _check_keys(where, raw, ["name", "options", "label", "budgets"])
        if "name" not in raw:
            raise ValueError(f"Sweep spec: {where} needs a name (one of {available_methods()}).")
        name = str(raw["name"])
        method_class(name)  # unknown method: ValueError listing the registry
        options = _mapping(f"options of method {name!r}", raw.get("options"))
        allowed = [o for o in method_options(name) if o not in RESERVED_OPTIONS]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"Sweep spec: method {name!r} has no option(s) {unknown}; its options are {allowed}.")
        budgets = _ratios(f"budgets of method {name!r}", raw["budgets"]) if "budgets" in raw else None
        return cls(name=name, options=options, label=str(raw.get("label") or name), budgets=budgets)


@dataclass(frozen=True)
class ModelEntry:
    """One CTR model of ``recsys_embed.models`` (by class name) and its keyword options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, raw: Any) -> ModelEntry:
        if isinstance(raw, str):
            raw = {"name": raw}
        where = f"models entry {raw!r}"
        raw = _mapping(where, raw)
        _check_keys(where, raw, ["name", "options", "label"])
        name = str(raw.get("name", ""))
        known = available_models()
        if name not in known:
            raise ValueError(f"Sweep spec: unknown model {name!r}; models are {known} (recsys_embed.models).")
        options = _mapping(f"options of model {name!r}", raw.get("options"))
        params = inspect.signature(getattr(model_zoo, name).__init__).parameters
        allowed = [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"Sweep spec: model {name!r} has no option(s) {unknown}; its options are {allowed}.")
        return cls(name=name, options=options, label=str(raw.get("label") or name))

    def model_class(self) -> type:
        return getattr(model_zoo, self.name)


def available_models() -> list[str]:
    """CTR model classes a spec may name (they take ``(embedding, num_dense, *, options)``; the graph models of
    ``recsys_embed.models`` train in ``GraphTask``, not in sweep cells)."""
    classes = {name: getattr(model_zoo, name) for name in model_zoo.__all__}
    return sorted(n for n, c in classes.items() if isinstance(c, type) and not issubclass(c, model_zoo.GraphModel))


@dataclass(frozen=True)
class DatasetEntry:
    """A CTR dataset: a prepared folder (``data_dir``, with its :func:`~identity.data_fingerprint`) or the
    embedded synthetic data of a given size."""

    name: str
    data_dir: str | None = None
    synthetic: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    @classmethod
    def parse(cls, raw: Any) -> DatasetEntry:
        if isinstance(raw, str):
            raw = {"name": raw}
        where = f"datasets entry {raw!r}"
        raw = _mapping(where, raw)
        _check_keys(where, raw, ["name", "data_dir", "synthetic"])
        if "name" not in raw:
            raise ValueError(f"Sweep spec: {where} needs a name.")
        if raw.get("data_dir") and raw.get("synthetic"):
            raise ValueError(f"Sweep spec: {where} gives both data_dir and synthetic; give one.")
        synthetic = _mapping(f"synthetic of dataset {raw['name']!r}", raw.get("synthetic"))
        _check_keys(
            f"synthetic of dataset {raw['name']!r}", synthetic, [f.name for f in dataclasses.fields(SyntheticConfig)]
        )
        SyntheticConfig(**synthetic)  # validates the sizes now, not in the middle of a sweep
        name, data_dir = str(raw["name"]), str(raw["data_dir"]) if raw.get("data_dir") else None
        fingerprint = identity.data_fingerprint(data_dir, name) if data_dir else ""  # missing data: error now
        return cls(name=name, data_dir=data_dir, synthetic=synthetic, fingerprint=fingerprint)

    def synthetic_config(self) -> SyntheticConfig:
        return SyntheticConfig(**self.synthetic)

    def resolved(self) -> dict[str, Any]:
        """What identifies the data: the folder and its fingerprint, or the full synthetic config (defaults
        included)."""
        if self.data_dir:
            return {"data_dir": self.data_dir, "fingerprint": self.fingerprint}
        return {"synthetic": dataclasses.asdict(self.synthetic_config())}


@dataclass(frozen=True)
class TrainingSettings:
    """How every cell trains (the same settings as a ``recsys-embed fit`` config).

    ``max_steps=-1`` trains ``max_epochs`` epochs; ``limit_{train,val,test}_batches`` follow Lightning (an int is
    batches, a float a fraction; prefer ``limit_train_batches`` to ``max_steps`` for short runs, since validation
    runs at the end of each epoch). ``csv_logs`` writes each cell's Lightning CSV log under ``OUTPUT/runs/``.
    ``optimizer`` is the dense optimizer (``class_path`` + ``init_args``). Every setting but
    :attr:`LOG_ONLY` ones is part of a cell's id.
    """

    #: settings that change what is logged, not the result (left out of cell ids)
    LOG_ONLY: ClassVar[tuple[str, ...]] = ("csv_logs", "log_every_n_steps")

    embedding_dim: int = 16
    batch_size: int = 4096
    eval_batch_size: int | None = None
    max_epochs: int = 1
    max_steps: int = -1
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    sparse_optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "rowwise_adagrad", "lr": 0.05})
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}
    )
    accelerator: str = "auto"
    csv_logs: bool = True
    log_every_n_steps: int = 50

    @classmethod
    def parse(cls, raw: Any) -> TrainingSettings:
        raw = _mapping("training", raw)
        _check_keys("training", raw, [f.name for f in dataclasses.fields(cls)])
        settings = cls(**raw)
        if settings.embedding_dim <= 0 or settings.batch_size <= 0:
            raise ValueError("Sweep spec: training.embedding_dim and training.batch_size must be positive.")
        if settings.max_steps == -1 and settings.max_epochs <= 0:
            raise ValueError("Sweep spec: set training.max_steps > 0 or training.max_epochs > 0.")
        SparseOptimizer(**settings.sparse_optimizer)  # unknown name/lr: ValueError now
        optimizer = _mapping("training.optimizer", settings.optimizer)
        _check_keys("training.optimizer", optimizer, ["class_path", "init_args"])
        if "class_path" not in optimizer:
            raise ValueError("Sweep spec: training.optimizer needs a class_path (e.g. torch.optim.Adam).")
        identity.optimizer_settings(optimizer)  # a class path that does not import: ValueError now
        return settings


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep: methods (expanded), budgets, datasets, models, seeds and training settings."""

    name: str
    methods: tuple[MethodEntry, ...]
    budgets: tuple[float, ...]
    datasets: tuple[DatasetEntry, ...]
    models: tuple[ModelEntry, ...]
    seeds: tuple[int, ...]
    training: TrainingSettings
    source: str = ""


SPEC_KEYS = ["name", "methods", "budgets", "datasets", "models", "seeds", "training", "quick", "description"]


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_spec(raw: Mapping[str, Any], *, quick: bool = False, source: str = "") -> SweepSpec:
    """Validate a spec mapping (as loaded from YAML); with ``quick``, apply its ``quick:`` overrides first."""
    raw = _mapping("the sweep spec", raw)
    _check_keys("the sweep spec", raw, SPEC_KEYS)
    overrides = _mapping("quick", raw.pop("quick", None))
    if quick:
        _check_keys("quick", overrides, [k for k in SPEC_KEYS if k not in ("quick", "description")])
        raw = _merge(raw, overrides)
    name = str(raw.get("name") or (Path(source).stem if source else "sweep")) + ("-quick" if quick else "")
    entries: list[MethodEntry] = []
    wants_all = False
    for item in _list("methods", raw.get("methods", [ALL_METHODS])):
        if item == ALL_METHODS:
            wants_all = True
        else:
            entries.append(MethodEntry.parse(item))
    if wants_all:  # every registered method that no explicit entry already names
        named = {e.name for e in entries}
        entries += [MethodEntry(name=m, label=m) for m in available_methods() if m not in named]
    labels = [e.label for e in entries]
    if not entries or len(set(labels)) != len(labels):
        raise ValueError(f"Sweep spec: methods must be non-empty with distinct labels (got {labels}).")
    datasets = tuple(DatasetEntry.parse(d) for d in _list("datasets", raw.get("datasets", [{"name": "synthetic"}])))
    models = tuple(ModelEntry.parse(m) for m in _list("models", raw.get("models", ["DLRM"])))
    for what, items in (("datasets", [d.name for d in datasets]), ("models", [m.label for m in models])):
        if not items or len(set(items)) != len(items):
            raise ValueError(f"Sweep spec: {what} must be non-empty with distinct names (got {items}).")
    seeds = _list("seeds", raw.get("seeds", [0]))
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"Sweep spec: seeds must be a non-empty list of distinct integers (got {seeds!r}).")
    return SweepSpec(
        name=name,
        methods=tuple(sorted(entries, key=lambda e: (e.name != "full", e.label))),
        budgets=_ratios("budgets", raw.get("budgets", list(DEFAULT_BUDGETS))),
        datasets=datasets,
        models=models,
        seeds=tuple(int(s) for s in seeds),
        training=TrainingSettings.parse(raw.get("training")),
        source=source,
    )


def load_spec(path: str | Path, *, quick: bool = False) -> SweepSpec:
    """Read and validate a sweep spec YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Sweep spec {str(path)!r} does not exist; pass --config with a YAML file.")
    with path.open() as handle:
        raw = yaml.safe_load(handle)
    return parse_spec(raw or {}, quick=quick, source=str(path))


@dataclass(frozen=True)
class Cell:
    """One training run of the grid. ``cell_id`` hashes everything that changes its result."""

    sweep: str
    dataset: DatasetEntry
    model: ModelEntry
    method: MethodEntry
    budget: float
    seed: int
    training: TrainingSettings

    def settings(self) -> dict[str, Any]:
        """The cell's identity (JSON-able): everything that changes its result, defaults filled in.

        Two cells whose settings differ only in ``seed`` are seeds of one setting, the only rows a report pools.
        """
        model, method = self.model, self.method
        model_options = identity.model_options(model.model_class(), model.options)
        method_options = identity.method_options(method.name, method.options, RESERVED_OPTIONS)
        return {
            "format": identity.IDENTITY_FORMAT,
            "recsys_embed": recsys_embed.__version__,
            "dataset": {"name": self.dataset.name, **self.dataset.resolved()},
            "model": {"name": model.name, "label": model.label, "options": model_options},
            "method": {"name": method.name, "label": method.label, "version": method_class(method.name).version}
            | {"options": method_options},
            "budget_ratio": self.budget,
            "seed": self.seed,
            "training": identity.training_settings(self.training, TrainingSettings.LOG_ONLY),
        }

    @property
    def cell_id(self) -> str:
        return identity.stable_hash(self.settings())

    def describe(self) -> str:
        return f"{self.method.label} @ {self.budget:g}x | {self.model.label} | {self.dataset.name} | seed {self.seed}"


def expand_grid(spec: SweepSpec) -> list[Cell]:
    """Every cell, in run order: dataset, model, seed, method, budget (a partial sweep holds whole seeds)."""
    cells = [
        Cell(spec.name, dataset, model, method, budget, seed, spec.training)
        for dataset in spec.datasets
        for model in spec.models
        for seed in spec.seeds
        for method in spec.methods
        for budget in (method.budgets or spec.budgets)
    ]
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):  # only possible with duplicated entries
        raise ValueError("Sweep spec: two cells have the same settings; remove the duplicated entry.")
    return cells


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N, e.g. 0/4 (got {text!r}).") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard i/N needs N >= 1 and 0 <= i < N (got {text!r}).")
    return index, count


def shard(cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """The cells of shard ``index`` of ``count``: position in the id-sorted grid modulo ``count`` (run order kept).

    Sorting by id makes the split independent of spec order and spreads slow methods over the shards.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"Shard {index}/{count}: need count >= 1 and 0 <= index < count.")
    ranked = sorted(c.cell_id for c in cells)
    mine = {cell_id for position, cell_id in enumerate(ranked) if position % count == index}
    return [c for c in cells if c.cell_id in mine]

"""The method interface: every compression method is a TorchRec-compatible embedding module.

A method is built from the *logical* tables a model expects (TorchRec ``EmbeddingBagConfig``s) and maps a
``KeyedJaggedTensor`` to a ``KeyedTensor`` with the same keys, order and dims as a full
``EmbeddingBagCollection``. What it stores to serve is reported by :meth:`EmbeddingMethod.memory_bytes`, the one
memory definition of the project::

    full_bytes = sum(num_embeddings * embedding_dim * 4)  over the logical tables
    ratio      = full_bytes / memory_bytes()

Methods whose storage is rows declare those rows (:meth:`EmbeddingMethod.add_tables`: plain TorchRec
``EmbeddingBagCollection`` or ``EmbeddingCollection`` children with :class:`TableOptions`); the training layer
turns the declarations into fbgemm table-batched kernels with a fused optimizer, or shards them with TorchRec.

The interface, second version (every part optional, with a default):

- **served form**: :meth:`to_serving` returns a module with the same outputs whose parameters and buffers are
  exactly :meth:`memory_bytes`; the trained form may be larger (:meth:`training_bytes`);
- **stages**: :meth:`stages` (default one, ``"train"``), with per-stage :meth:`regularizer`,
  :meth:`on_train_step`, :meth:`stage_parameter_groups`, :meth:`finish_stage` (e.g. a search scored on validation
  data) and :meth:`next_stage` (the next stage's form);
- **per-id rows**: :meth:`embeddings` and :meth:`all_embeddings`, batched, with gradients;
- **self-described**: :meth:`config` (the resolved knobs: a rebuild never re-solves a budget),
  :meth:`from_config`, a class ``version``; :func:`recsys_embed.methods.saving.save_method` saves a method alone.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    KeyedTensor,
)

from recsys_embed.methods import checks
from recsys_embed.methods.checks import IdBounds, check_ids, in_feature_order
from recsys_embed.methods.storage import PRECISION_DATA_TYPE, SparseOptimizer, TableOptions, TableStorage
from recsys_embed.methods.tables import FP32_BYTES, Budget, check_tables, feature_names, full_bytes  # noqa: F401

#: bytes of an int64 (hash seeds, stored ids)
INT64_BYTES = 8
#: fbgemm's table-batched kernels need every physical embedding dim to be a multiple of this
TBE_DIM_MULTIPLE = 4


@dataclass(frozen=True)
class Stage:
    """One training stage of a method: its name and, optionally, its own number of epochs.

    Single-stage methods have one stage, ``"train"``. A staged method (search, prune, retrain) lists its stages in
    order; the training layer runs each as its own fit with its own checkpoint, and builds each stage's form from
    the previous one's with :meth:`EmbeddingMethod.next_stage`.
    """

    name: str
    max_epochs: int | None = None  # None: the trainer's max_epochs
    description: str = ""


@dataclass
class ParameterGroup:
    """Parameters a stage trains with their own optimizer (architecture weights, thresholds), not the dense one."""

    name: str
    params: list[nn.Parameter]
    optimizer: str = "adam"  # a torch.optim class name, lower case: adam, sgd, adagrad
    lr: float = 1e-3
    options: dict[str, Any] = field(default_factory=dict)


class EmbeddingMethod(nn.Module):
    """Base class of every compression method (TorchRec ``EmbeddingBagCollection`` interface).

    Subclasses implement :meth:`lookup` and :meth:`memory_bytes`, take their options keyword-only, declare their
    row tables with :meth:`add_tables`, and may implement :meth:`from_budget` to solve their own knob for a
    :class:`Budget`. The options given to the constructor are recorded, so :meth:`config` needs no code in a method.
    """

    #: the registered name (set by :func:`recsys_embed.methods.registry.register`)
    name: ClassVar[str] = ""
    #: the options a budget solver sets itself (giving one of them together with ``budget=`` is an error)
    budget_knobs: ClassVar[tuple[str, ...]] = ()
    #: whether the method needs per-id frequencies (``id_counts=``, from the data's ``id_counts.npz``)
    needs_id_counts: ClassVar[bool] = False
    #: bumped when a change makes saved states of older versions unloadable or different in meaning
    version: ClassVar[int] = 1
    #: constructor options that are data or placement, not knobs (left out of :meth:`config`)
    config_exclude: ClassVar[tuple[str, ...]] = ("device",)
    #: parameters and buffers the trained form keeps and the default :meth:`to_serving` drops (counters, shadows)
    training_state: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap each subclass ``__init__`` so the options it was built with are recorded for :meth:`config`."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def init_recording_options(self: EmbeddingMethod, tables: Sequence[EmbeddingBagConfig], **options: Any) -> None:
            outermost = not self.__dict__.get("_building", False)  # the call the user made records its options
            self.__dict__["_building"] = True
            try:
                init(self, tables, **options)
            finally:
                if outermost:
                    self.__dict__["_building"] = False
            if outermost:
                self._options = dict(options)

        cls.__init__ = init_recording_options  # type: ignore[method-assign]

    def __init__(self, tables: Sequence[EmbeddingBagConfig], *, validate_ids: bool = True) -> None:
        super().__init__()
        self._tables = check_tables(tables)
        self._feature_names = feature_names(self._tables)
        self._length_per_key = [t.embedding_dim for t in self._tables for _ in t.feature_names]
        self._cardinality = {f: t.num_embeddings for t in self._tables for f in t.feature_names}
        self._table_of = {f: t.name for t in self._tables for f in t.feature_names}
        self._table_index = [i for i, t in enumerate(self._tables) for _ in t.feature_names]  # per feature
        self.validate_ids = validate_ids
        #: features whose ids may exceed the cardinality because the method hashes them (set by the method)
        self.unbounded_features: set[str] = set()
        self._storage: list[TableStorage] = []
        self._options: dict[str, Any] = {}
        #: the stage this form trains in (staged methods take it as an option)
        self.stage = self.stages()[0].name

    # ---- declared storage ------------------------------------------------------------------------------------
    def add_tables(
        self,
        path: str,
        configs: Sequence[EmbeddingBagConfig] | Sequence[EmbeddingConfig],
        *,
        pooled: bool = True,
        options: TableOptions = TableOptions(),
        device: str | torch.device | None = None,
    ) -> EmbeddingBagCollection | EmbeddingCollection:
        """Create the TorchRec collection holding ``configs`` as child ``path`` and declare it (see
        :mod:`recsys_embed.methods.storage`): pooled rows are an ``EmbeddingBagCollection``, unpooled rows an
        ``EmbeddingCollection``. The weights' dtype follows ``options.precision``."""
        if options.method_owned:
            raise ValueError(
                f"Tables {path!r}: method-owned rows are updated by the method and must not be TorchRec collections "
                "(the planner would shard them); hold them in your own module and call declare_storage()."
            )
        data_type = PRECISION_DATA_TYPE[options.precision]
        configs = [replace(t, data_type=data_type) for t in configs]
        dev = torch.device(device or "cpu")
        if pooled:
            module: nn.Module = EmbeddingBagCollection(tables=configs, device=dev)  # type: ignore[arg-type]
        else:
            module = EmbeddingCollection(tables=configs, device=dev)  # type: ignore[arg-type]
        self.add_module(path, module)
        self.declare_storage(TableStorage(path=path, configs=tuple(configs), pooled=pooled, options=options))
        return module  # type: ignore[return-value]

    def declare_storage(self, storage: TableStorage) -> None:
        """Declare rows held by child ``storage.path`` (use :meth:`add_tables` for TorchRec collections)."""
        self._storage = [s for s in self._storage if s.path != storage.path] + [storage]

    def storage(self) -> list[TableStorage]:
        """The method's declared row storage; fusing and sharding act on these declarations only."""
        return list(self._storage)

    def sparse_optimizer_for(self, storage: TableStorage, default: SparseOptimizer) -> SparseOptimizer:
        """The fused optimizer of ``storage``: its own override, else the run's ``default``."""
        return storage.options.optimizer or default

    # ---- the TorchRec EBC surface -------------------------------------------------------------------------
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The logical tables (what a full EBC would hold); models read feature names and dims from here."""
        return self._tables

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Check the keys (and ids unless ``validate_ids=False``), then :meth:`lookup` in table order.

        Traced forms (``torchrec.fx.symbolic_trace``, ``torch.export``): under fx the checks and the key order are
        one leaf call, run on every input, and the graph needs a batch of at least one example; under export the
        key order is fixed by the example input (part of the exported input spec) and ids are not checked (that
        needs their values).
        """
        if is_fx_symbolic_tracing():
            features = checks.checked_features(features, self._feature_names, self._id_bounds())
            return self.lookup(features)
        features = self._keyed(features)
        if features.stride() == 0:  # TorchRec's collections cannot split an empty batch
            values = torch.zeros(0, sum(self._length_per_key), device=self.device)
            return KeyedTensor(keys=self._feature_names, length_per_key=self._length_per_key, values=values)
        return self.lookup(features)

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:  # pragma: no cover - abstract
        """The method itself: a checked KJT (keys in table order) -> pooled ``KeyedTensor``."""
        raise NotImplementedError

    # ---- memory and the served form --------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes the method stores to serve (tables, codebooks, MLPs, hash parameters); no optimizer state. Equals
        the parameter and buffer bytes of :meth:`to_serving`'s module (checked by the contract test)."""
        raise NotImplementedError

    def training_bytes(self) -> int:
        """Bytes of this (trained) form's parameters and persistent buffers: ``>= memory_bytes()`` (shadows,
        supernets, query tables); no optimizer state."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def to_serving(self) -> nn.Module:
        """The served form, in eval mode: same ``KJT -> KeyedTensor`` outputs, exactly ``memory_bytes()`` stored.

        Default, for methods whose trained form is their served form: a fresh plain (unfused) copy built from
        :meth:`config`, with this form's weights, without :attr:`training_state`. A method whose served form
        differs (codes instead of a query table, kept rows only) overrides it.
        """
        served = type(self).from_config(self._tables, self.config(), device=self.device)
        served.load_state_dict({k: v.detach() for k, v in self.state_dict().items()})
        for name in self.training_state:
            delattr(served, name)
        stored = sum(t.numel() * t.element_size() for t in served.state_dict().values())
        if stored != self.memory_bytes():
            raise ValueError(
                f"Method {self.name!r}: its served form stores {stored} bytes but memory_bytes() says "
                f"{self.memory_bytes()}: list training-only parameters and buffers in training_state, override "
                "to_serving(), or fix the memory formula."
            )
        return served.eval()

    def full_bytes(self) -> int:
        return full_bytes(self._tables)

    def compression_ratio(self) -> float:
        return self.full_bytes() / self.memory_bytes()

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> EmbeddingMethod:
        """Build the method with its knob solved so that ``memory_bytes() <= budget``."""
        raise ValueError(
            f"Method {cls.name!r} has no budget solver: build it with explicit options instead of budget=."
        )

    # ---- self-description -------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The resolved knobs: every keyword option with the value this form was built with (defaults filled in,
        budget already solved), minus :attr:`config_exclude`. ``from_config(tables, config())`` rebuilds the form."""
        resolved = self.with_defaults(self._options)
        return {k: v for k, v in resolved.items() if k not in self.config_exclude}

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Every keyword-only constructor option that has a default, with that default.

        Read from the constructor's signature, the one source of truth: budget solvers look defaults up here
        (through :meth:`with_defaults`) instead of restating them, so changing a default in ``__init__`` changes
        what the solver plans for too.
        """
        params = inspect.signature(cls.__init__).parameters
        return {
            p.name: p.default
            for p in params.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
        }

    @classmethod
    def with_defaults(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` over the constructor's defaults (:meth:`option_defaults`): what ``cls(tables, **options)``
        would be built with, for the options that have defaults or were given."""
        return {**cls.option_defaults(), **options}

    @classmethod
    def from_config(
        cls, tables: Sequence[EmbeddingBagConfig], config: dict[str, Any], device: str | torch.device | None = None
    ) -> EmbeddingMethod:
        """Build the form :meth:`config` describes (weights and data-derived buffers come from a state dict)."""
        return cls(tables, **config, device=device)

    # ---- stages -----------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        """The method's training stages in order (default: one, ``"train"``)."""
        return [Stage("train")]

    def regularizer(self) -> torch.Tensor | None:
        """A term added to the training loss in the current stage (default: none)."""
        return None

    def on_train_step(self, step: int) -> None:
        """Called after each optimizer step of the current stage, ``step`` counting from 0 within the stage."""

    def stage_parameter_groups(self) -> list[ParameterGroup]:
        """Parameters the current stage trains with their own optimizer (excluded from the dense optimizer)."""
        return []

    def finish_stage(self, evaluate: Callable[[int | None], float]) -> None:
        """Called once at the end of each stage, after its training (a stage with ``max_epochs=0`` trains nothing and
        does only this: a search, a calibration). ``evaluate(max_batches)`` returns the validation AUC of the whole
        model with the method as it is at the call (over the first ``max_batches`` validation batches, or all);
        whatever the method changes in its parameters or buffers is saved in the stage's final checkpoint."""

    def next_stage(self) -> EmbeddingMethod:
        """The next stage's form, built from this trained one (a new module, or ``self`` changed in place)."""
        names = [s.name for s in self.stages()]
        raise ValueError(f"Method {self.name!r} has no stage after {self.stage!r} (its stages: {names}).")

    # ---- per-id rows ------------------------------------------------------------------------------------------
    def embeddings(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """``(len(ids), dim)``: the embedding of each id of ``feature``, batched, with gradients (graph models).

        Default: one forward over a KJT whose bags hold one id each of ``feature`` (the other features empty).
        """
        if feature not in self._cardinality:
            raise ValueError(f"Unknown feature {feature!r}; the tables read {self._feature_names}.")
        ids = ids.reshape(-1).to(torch.int64)
        batch = ids.numel()
        index = self._feature_names.index(feature)
        lengths = torch.zeros(len(self._feature_names), batch, dtype=torch.int64, device=ids.device)
        lengths[index] = 1
        kjt = KeyedJaggedTensor(keys=self._feature_names, values=ids, lengths=lengths.view(-1), stride=batch)
        start = sum(self._length_per_key[:index])
        return self(kjt).values()[:, start : start + self._length_per_key[index]]

    def all_embeddings(self, feature: str, batch_size: int = 65536) -> torch.Tensor:
        """``(num_embeddings, dim)``: every row of ``feature``'s logical table, in batches of ``batch_size`` ids."""
        if feature not in self._cardinality:
            raise ValueError(f"Unknown feature {feature!r}; the tables read {self._feature_names}.")
        ids = torch.arange(self._cardinality[feature], device=self.device)
        return torch.cat([self.embeddings(feature, chunk) for chunk in ids.split(batch_size)])

    # ---- input checks -----------------------------------------------------------------------------------------
    def _keyed(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Check keys (and ids unless disabled, or while exporting); return the KJT in the tables' feature order."""
        features = in_feature_order(features, self._feature_names)
        if self.validate_ids and not torch.compiler.is_exporting():
            self._check_ids(features)
        return features

    def _check_ids(self, features: KeyedJaggedTensor) -> None:
        check_ids(features, self._feature_names, self._id_bounds(force=True))

    def _id_bounds(self, force: bool = False) -> IdBounds | None:
        """What :func:`check_ids` needs, as plain values an fx graph can hold (None: ``validate_ids=False``)."""
        if not (self.validate_ids or force):
            return None
        return IdBounds(
            method=self.name,
            cardinality=dict(self._cardinality),
            unbounded=sorted(self.unbounded_features),
            tables=dict(self._table_of),
        )

"""A test-only two-stage method (never registered by importing this module; use :func:`registered`).

Stage ``warmup``: full tables whose pooled vectors are multiplied by a learnable per-field scale, trained in its
own parameter group (SGD), with an L2 regularizer pulling the scale to 1 whose weight ramps up with the step (the
per-step hook). Stage ``frozen``: the same rows, the trained scale frozen into a buffer. A buffer counts the
hook's calls, and :data:`HOOK_CALLS` records them in this process; ``KILL_AT`` simulates a kill.

Example::

    with registered():
        main(["fit", "--config", ..., "--model.embedding.method=staged_toy"])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods import Budget, ParameterGroup, Stage
from recsys_embed.methods.base import FP32_BYTES, EmbeddingMethod, full_bytes
from recsys_embed.methods.registry import _REGISTRY, register

NAME = "staged_toy"
#: (stage, step) of every on_train_step call in this process
HOOK_CALLS: list[tuple[str, int]] = []
#: (stage, step) at which on_train_step raises SimulatedKill (a run killed mid-stage)
KILL_AT: list[tuple[str, int]] = []


class SimulatedKill(Exception):
    """Raised by the hook at a step listed in :data:`KILL_AT`."""


class StagedToy(EmbeddingMethod):
    """Full tables times a per-field scale: learnt (with an L2 pull to 1) in ``warmup``, frozen in ``frozen``."""

    version = 3
    training_state = ("hook_calls",)  # a training counter: not served

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        stage: str = "warmup",
        l2: float = 0.5,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        if stage not in ("warmup", "frozen"):
            raise ValueError(f"Method {NAME!r}: stage must be 'warmup' or 'frozen' (got {stage!r}).")
        self.stage, self.l2 = stage, l2
        dev = torch.device(device or "cpu")
        self.tables = self.add_tables("tables", self._tables, device=dev)
        scale = torch.ones(len(self._feature_names), device=dev)
        if stage == "warmup":
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("hook_calls", torch.zeros((), dtype=torch.int64, device=dev))
        self._ramp = 0.0

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> StagedToy:
        """No knob to solve: the full tables whatever the budget (a test method)."""
        return cls(tables, **options)  # type: ignore[arg-type]

    def stages(self) -> list[Stage]:
        return [Stage("warmup", description="learn a per-field scale"), Stage("frozen", description="scale frozen")]

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.tables(features)
        scale = torch.repeat_interleave(self.scale, torch.tensor(self._length_per_key, device=self.scale.device))
        return KeyedTensor(keys=pooled.keys(), length_per_key=pooled.length_per_key(), values=pooled.values() * scale)

    def memory_bytes(self) -> int:
        return full_bytes(self._tables) + FP32_BYTES * len(self._feature_names)

    def regularizer(self) -> torch.Tensor | None:
        if self.stage != "warmup":
            return None
        return self.l2 * (0.5 + self._ramp) * ((self.scale - 1.0) ** 2).sum()

    def on_train_step(self, step: int) -> None:
        HOOK_CALLS.append((self.stage, step))
        if (self.stage, step) in KILL_AT:
            raise SimulatedKill(f"killed at {self.stage} step {step}")
        self.hook_calls += 1
        self._ramp = min(1.0, (step + 1) / 10)

    def stage_parameter_groups(self) -> list[ParameterGroup]:
        if self.stage != "warmup":
            return []
        return [ParameterGroup("scale", [self.scale], optimizer="sgd", lr=0.5)]

    def next_stage(self) -> EmbeddingMethod:
        if self.stage != "warmup":
            return super().next_stage()
        frozen = type(self).from_config(self._tables, {**self.config(), "stage": "frozen"}, device=self.device)
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        frozen.load_state_dict(state)
        return frozen


@contextlib.contextmanager
def registered() -> Iterator[type[StagedToy]]:
    """Register :class:`StagedToy` as ``staged_toy`` for the duration of the block (and clear the records)."""
    register(NAME)(StagedToy)
    HOOK_CALLS.clear()
    KILL_AT.clear()
    try:
        yield StagedToy
    finally:
        _REGISTRY.pop(NAME, None)
        KILL_AT.clear()

"""Low-precision rows shared by ``quant`` and ``alpt``: integer rows with a step size, stochastic rounding, and a
method-owned sparse update applied inside backward.

A value ``w`` is stored as the integer ``q = clamp(round(w / step), -2^(b-1), 2^(b-1) - 1)`` (``b`` = 8 or 16 bits)
and read as ``q * step``. Training rounds stochastically (:func:`stochastic_round`: ``floor(x + u)``, ``u ~ U[0, 1)``,
so ``E[round(x)] = x`` and updates smaller than a step still move a row in expectation, as Gupta et al., ICML'15,
"Deep Learning with Limited Numerical Precision" show is needed for low-precision training).

:class:`LowPrecisionMethod` holds each table's integer rows as buffers of a child module (``rows.t{i}``, declared
method-owned storage: never fused nor sharded) and reads them with a gather and ``embedding_bag``. In training
mode the gathered rows are a leaf whose gradient hook updates the rows (like fbgemm's fused optimizer, inside
backward): duplicate ids' gradients are summed, the optimizer step is computed in fp32 on the dequantised rows,
and the result is written back with stochastic rounding (:meth:`LowPrecisionMethod.update_rows`). So no
parameter of the method gets a ``.grad``, and the dense optimizer never sees the rows. Optimizer state (row-wise
Adagrad accumulators) lives in the child ``optimizer_state``, dropped by the served form.

fbgemm's training kernels (TBE) offer fp32/fp16 weights only (fp16 with stochastic rounding is
``TableOptions(precision="fp16")``); int8 exists only in its inference kernels, as TorchRec's
``QuantEmbeddingBagCollection``, whose rows carry an fp16 scale and bias each and are padded (32 bytes a row on CPU
at dim 16: 2x, not 4x) and which has no int16: so these rows, their update and their served form are our own.

Example::

    q = quantise(w, step=1 / 128, bits=8, stochastic=True)   # int8, unbiased
    w_read = dequantise(q, 1 / 128)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import EmbeddingMethod
from recsys_embed.methods.layouts import keyed
from recsys_embed.methods.row_pruning import initial_rows
from recsys_embed.methods.storage import TableOptions, TableStorage

INT_DTYPES: dict[int, torch.dtype] = {8: torch.int8, 16: torch.int16}
ROW_OPTIMIZERS = ("sgd", "rowwise_adagrad")


def int_range(bits: int) -> tuple[int, int]:
    """The integers a ``bits``-bit row value takes: ``(-2^(bits-1), 2^(bits-1) - 1)``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_low_precision(method: str, bits: int, clip: float, rows_optimizer: str, rows_lr: float) -> None:
    """One clear error for each bad low-precision option."""
    if bits not in INT_DTYPES:
        raise ValueError(f"Method {method!r}: bits must be 8 or 16 (got {bits}); 8 bits store 4x less than fp32.")
    if not clip > 0:
        raise ValueError(f"Method {method!r}: clip must be positive (got {clip}); it is the largest value a row holds.")
    if rows_optimizer not in ROW_OPTIMIZERS or not rows_lr > 0:
        raise ValueError(
            f"Method {method!r}: rows_optimizer must be one of {ROW_OPTIMIZERS} and rows_lr positive (got "
            f"{rows_optimizer!r}, {rows_lr})."
        )


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(x + u)``, ``u ~ U[0, 1)``: rounds up with probability ``x - floor(x)``, so ``E[result] = x``."""
    return torch.floor(x + torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator))


def quantise(
    w: torch.Tensor,
    step: torch.Tensor | float,
    bits: int,
    *,
    stochastic: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``w / step`` rounded (stochastically, from ``generator`` if given, or to nearest) and clamped to ``bits``-bit
    integers."""
    scaled = w / step
    rounded = stochastic_round(scaled, generator) if stochastic else torch.round(scaled)
    low, high = int_range(bits)
    return rounded.clamp_(low, high).to(INT_DTYPES[bits])


def dequantise(q: torch.Tensor, step: torch.Tensor | float) -> torch.Tensor:
    """The fp32 values of integer rows ``q``: ``q * step``."""
    return q.to(torch.float32) * step


def summed_row_gradients(ids: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``ids`` and, for each, the sum of its occurrences' gradient rows (one sort, one ``index_add``)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    return unique, grad.new_zeros(unique.numel(), grad.shape[1]).index_add_(0, inverse, grad)


def adagrad_step(grad: torch.Tensor, accumulator: torch.Tensor | None, ids: torch.Tensor, lr: float) -> torch.Tensor:
    """The change of each gradient row: ``lr * g`` (SGD, ``accumulator`` None) or row-wise Adagrad as fbgemm's
    (``a += mean(g^2)`` per row, ``lr * g / (sqrt(a) + 1e-8)``), updating ``accumulator[ids]``."""
    if accumulator is None:
        return lr * grad
    total = accumulator[ids] + grad.pow(2).mean(1)
    accumulator[ids] = total
    return lr * grad / (total.sqrt() + 1e-8).unsqueeze(1)


class LowPrecisionMethod(EmbeddingMethod):
    """Integer rows per logical table, read as ``q * step``, updated in backward by :meth:`update_rows`.

    Subclasses give :meth:`step` (table ``i``'s step sizes for ``ids``) and :meth:`update_rows`.
    """

    training_state = ("optimizer_state",)

    def _build_rows(
        self,
        bits: int,
        steps: Sequence[float],
        rows_optimizer: str,
        seed: int,
        device: str | torch.device | None,
    ) -> None:
        """Integer rows of TorchRec's initial values (seeded), rounded stochastically with ``steps[i]`` (seeded too):
        the values of a large table, ``±1/sqrt(n)``, are mostly below half a step, and rounding them to nearest would
        start every row at zero (8 bits, ``clip`` 1: every table over 65,536 rows), where a dot-product model (MF,
        LightGCN) has no gradient to leave."""
        dev, tables = torch.device(device or "cpu"), self._tables
        self.rows, self.optimizer_state = nn.Module(), nn.Module()
        for i, t in enumerate(tables):
            q = torch.zeros(t.num_embeddings, t.embedding_dim, dtype=INT_DTYPES[bits], device=dev)
            if dev.type != "meta":
                g = torch.Generator().manual_seed(seed * 1_000_003 + i + 7919)
                q.copy_(quantise(initial_rows(t, seed, i), steps[i], bits, stochastic=True, generator=g))
            self.rows.register_buffer(f"t{i}", q)
            if rows_optimizer == "rowwise_adagrad":
                self.optimizer_state.register_buffer(f"t{i}", torch.zeros(t.num_embeddings, device=dev))
        self.declare_storage(
            TableStorage("rows", tuple(tables), options=TableOptions(precision=f"int{bits}", method_owned=True))
        )

    @property
    def device(self) -> torch.device:
        return self.rows.t0.device

    def table_rows(self, i: int) -> torch.Tensor:
        return getattr(self.rows, f"t{i}")

    def accumulator(self, name: str) -> torch.Tensor | None:
        return getattr(self.optimizer_state, name, None)

    def step(self, i: int, ids: torch.Tensor) -> torch.Tensor | float:  # pragma: no cover - abstract
        """Table ``i``'s step size for each of ``ids``: a float, or a ``(len(ids), 1)`` or ``(1, 1)`` tensor."""
        raise NotImplementedError

    def update_rows(self, i: int, ids: torch.Tensor, grad: torch.Tensor) -> None:  # pragma: no cover - abstract
        """Apply the optimizer to table ``i``'s distinct ``ids`` given their summed gradient rows ``grad``."""
        raise NotImplementedError

    def dequantised(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """``(len(ids), d)`` fp32 rows of table ``i``."""
        return dequantise(self.table_rows(i)[ids], self.step(i, ids))

    def to_serving(self) -> nn.Module:
        """This method without its optimizer state, in eval mode: rows (and learnt steps) only, the same outputs."""
        served = type(self).from_config(self._tables, self.config(), device=self.device)
        del served.optimizer_state
        kept = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("optimizer_state.")}
        served.load_state_dict(kept)
        stored = sum(t.numel() * t.element_size() for t in served.state_dict().values())
        if stored != self.memory_bytes():  # pragma: no cover - a formula bug
            raise ValueError(f"Method {self.name!r}: served form stores {stored} bytes, not {self.memory_bytes()}.")
        return served.eval()

    def _on_rows_gradient(self, i: int, ids: torch.Tensor, grad: torch.Tensor) -> None:
        if ids.numel():
            with torch.no_grad():
                self.update_rows(i, *summed_row_gradients(ids, grad))

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        updating = self.training and torch.is_grad_enabled()
        if updating and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"Method {self.name!r} updates its integer rows in each process alone (method-owned rows are not "
                "sharded), so ranks would drift apart: train it on one process."
            )
        names = self._feature_names
        ids = features.values().split(features.length_per_key())
        lengths = features.lengths().view(len(names), -1)
        out: list[torch.Tensor] = []
        first = 0
        for i, table in enumerate(self._tables):  # a table's features read its rows once (one update per table)
            count = len(table.feature_names)
            table_ids = torch.cat([ids[j] for j in range(first, first + count)]).long()
            rows = self.dequantised(i, table_ids)
            if updating:  # the rows' gradient updates the integer rows inside backward
                rows.requires_grad_(True)
                rows.register_hook(functools.partial(self._on_rows_gradient, i, table_ids))
            offsets = F.pad(lengths[first : first + count].reshape(-1).cumsum(0), (1, 0))
            occurrence = torch.arange(table_ids.shape[0], device=table_ids.device)
            pooled = F.embedding_bag(occurrence, rows, offsets, mode="sum", include_last_offset=True)
            per_feature = pooled.view(count, -1, table.embedding_dim)  # the bags of each feature in turn
            out.extend(per_feature[k] for k in range(count))
            first += count
        return keyed(torch.cat(out, 1), names, self._length_per_key)

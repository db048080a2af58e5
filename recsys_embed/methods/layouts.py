"""Physical KJT layouts of the remap methods, run by :class:`recsys_embed.methods.remap.RemapExecutor`.

Each keeps fbgemm's CPU kernels on a fast path (measured): :class:`FanOut` (``k`` physical features),
:class:`BatchFanOut` (``k`` blocks of bags of each feature), :class:`BagFold` (``k`` ids per bag, summed by the
pooling), :func:`as_one_feature` (a shared table read by one physical feature). :class:`IdLayout` shapes a batch's
ids so that per-feature constants broadcast without a per-id copy. All work on whole batches.

Served forms trace with ``torchrec.fx.symbolic_trace`` and ``torch.export`` (as TorchRec's own modules do): the
steps that decide in Python from the ids (per-feature id counts, slicing per feature, building a KJT) are small
``torch.fx.wrap`` functions, leaf calls of an fx graph; while tracing, :class:`IdLayout` takes the layout that fits
any lengths instead of choosing one from the data (eager runs keep their fast paths, with the same operations).
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec import KeyedJaggedTensor, KeyedTensor


def fx_tracing() -> bool:
    """Whether ``torch.fx`` symbolic tracing runs (the KJT and tensors are proxies: no Python decision on them)."""
    return is_fx_symbolic_tracing()


def tracing() -> bool:
    """Whether ``torch.fx`` or ``torch.export`` traces the forward: take paths that hold for any ids and lengths."""
    return is_fx_symbolic_tracing() or torch.compiler.is_exporting()


@torch.fx.wrap
def key_lengths(features: KeyedJaggedTensor) -> torch.Tensor:
    """``(F,)`` int64: the number of ids of each feature (``length_per_key()`` as a tensor); an fx leaf."""
    if torch.compiler.is_exporting():  # from the lengths, not a list of data-dependent sizes
        return features.lengths().view(len(features.keys()), -1).sum(1)
    return torch.tensor(features.length_per_key(), device=features.values().device)


@torch.fx.wrap
def make_kjt(keys: list[str], values: torch.Tensor, lengths: torch.Tensor, stride: int) -> KeyedJaggedTensor:
    """``KeyedJaggedTensor(keys, values, lengths, stride)``; an fx leaf, so the new KJT is traced like an input."""
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=stride)


@torch.fx.wrap
def copies_per_feature(rows: torch.Tensor, sizes: list[int], copies: list[int], id_major: bool) -> torch.Tensor:
    """The ids of ``(k, N)`` ``rows`` feature by feature (``sizes`` ids each), ``copies[f]`` copies of feature ``f``:
    copy 0's ids, then copy 1's (``id_major=False``), or each id's copies side by side (``id_major=True``)."""
    pieces, start = [], 0
    for k, size in zip(copies, sizes):
        block = rows[:k, start : start + size]
        pieces.append((block.T if id_major else block).reshape(-1))
        start += size
    return torch.cat(pieces)


def physical_keys(features: list[str], copies: list[int]) -> list[str]:
    """``[f@0, ..., f@{k_f - 1}]`` for every feature, in feature order; a feature with one copy keeps its name."""
    return [f if k == 1 else f"{f}@{c}" for f, k in zip(features, copies) for c in range(k)]


def per_value(per_feature: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
    """``per_feature[f]`` for every id of feature ``f`` (one entry per id, feature-major), one ``repeat_interleave``."""
    return per_feature.repeat_interleave(key_lengths(features), output_size=features.values().numel())


class IdLayout:
    """A KJT's ids shaped so that per-feature constants broadcast against them without a per-id copy.

    When every feature has the same number of ids (one id per feature and sample, the usual CTR batch),
    :attr:`ids` is the ``(F, L)`` view of the values and a per-feature constant broadcasts as ``(F, 1)``; otherwise
    :attr:`ids` is the flat values and constants are spread with one ``repeat_interleave``. Elementwise results are
    the same either way; :meth:`flat` turns a result computed from :attr:`ids` back into one entry per id
    (feature-major, like the KJT's values).

    ``subset`` (sorted feature indices) names the features a method rewrites (e.g. the hashed ones); in the
    uniform layout only their rows are gathered into :attr:`ids`, and :meth:`merge` puts the results back among
    the untouched ids of the other features. :attr:`computed` lists the features whose ids :attr:`ids` holds (None
    while fx traces: every feature, in order).

    While ``torch.fx`` or ``torch.export`` traces (:func:`tracing`), the layout is the flat one whatever the
    lengths, because the choice would depend on the data (the results are the same).
    """

    def __init__(self, features: KeyedJaggedTensor, subset: list[int] | None = None) -> None:
        if tracing():
            self._flat_for_any_lengths(features)
            return
        values, lengths = features.values(), features.length_per_key()
        self.values, self.sizes = values, lengths
        self.uniform = bool(lengths) and lengths.count(lengths[0]) == len(lengths)
        self.computed = list(range(len(lengths)))
        self._subset: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        if self.uniform:
            self.ids = values.view(len(lengths), lengths[0])
            if subset is not None and len(subset) < len(lengths):
                self.computed = list(subset)
                self._subset = torch.tensor(subset, dtype=torch.int64, device=values.device)
                self.ids = self.ids.index_select(0, self._subset)
        else:
            self.ids = values
            self._lengths = torch.tensor(lengths, device=values.device)

    def _flat_for_any_lengths(self, features: KeyedJaggedTensor) -> None:
        """The flat layout, decided without the data (for tracing): :attr:`ids` are the values, every feature."""
        self.values = self.ids = features.values()
        self.sizes = features.length_per_key()  # an fx node / data-dependent sizes under export: used by pieces()
        self.uniform = False
        self.computed = None if fx_tracing() else list(range(len(features.keys())))
        self._subset = None
        self._lengths = key_lengths(features)

    def spread(self, per_feature: torch.Tensor) -> torch.Tensor:
        """A ``(..., F)`` per-feature tensor shaped to broadcast against :attr:`ids` (``(..., F', 1)``/``(..., N)``)."""
        if self._lengths is not None:
            return per_feature.repeat_interleave(self._lengths, dim=-1, output_size=self.values.numel())
        if self._subset is not None:
            per_feature = per_feature.index_select(-1, self._subset)
        return per_feature.unsqueeze(-1)

    def flat(self, result: torch.Tensor) -> torch.Tensor:
        """``(..., F, L)`` or ``(..., N)`` (a result with the ids' shape in its last dims) -> ``(..., N)``."""
        return result.flatten(-2) if self._lengths is None else result

    def pieces(self, result: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``result`` (the ids' shape) per feature of :attr:`computed`, in that order."""
        return list(result.unbind(0)) if self._lengths is None else list(result.split(self.sizes))

    def merge(self, result: torch.Tensor, rewritten: torch.Tensor) -> torch.Tensor:
        """``(..., N)``: ``result`` for the features where the bool ``(F,)`` ``rewritten`` is set, the ids elsewhere."""
        if self._subset is None:
            return self.flat(torch.where(self.spread(rewritten), result, self.ids))
        full = self.values.view(len(self.sizes), -1).expand(*result.shape[:-2], -1, -1).to(result.dtype, copy=True)
        return self.flat(full.index_copy_(result.dim() - 2, self._subset, result))


class FanOut:
    """Rewrites a KJT so that every feature ``f`` becomes ``k = max k_f`` physical features ``f@0 .. f@{k - 1}``.

    ``rows[c, i]`` is the physical row of copy ``c`` of id ``i``. Copy ``c < k_f`` keeps its feature's bag
    lengths, so pooling it gives exactly the pooled rows of hash/partition/chunk ``c``; copies at or beyond a
    feature's ``k_f`` are muted (empty bags, pooled to zero), which keeps the pooled layout a uniform
    ``(B, F, k, d)`` that combines with a reshape.
    """

    def __init__(self, features: list[str], copies: list[int]) -> None:
        self.features, self.copies, self.most = list(features), list(copies), max(copies)
        self.keys = physical_keys(self.features, [self.most] * len(self.features))
        live = [c < k for k in self.copies for c in range(self.most)]  # per (feature, copy) segment
        self.live = None if all(live) else torch.tensor(live)

    def __call__(self, features: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
        values, lengths = self.fan(features, rows)
        return make_kjt(self.keys, values, lengths, features.stride())

    def fan(self, features: KeyedJaggedTensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and lengths of the fanned-out KJT: per feature, copy 0's bags, then copy 1's, ...

        ``rows`` is ``(k, N)``, or ``(k, F, L)`` for a batch with ``L`` ids per feature (:class:`IdLayout`'s uniform
        layout), which is taken as one reshape (a view when ``rows`` is stored feature-major) if every copy is live.
        ``k`` is the most copies of any feature (``self.most``).
        """
        copies = self.most
        if not fx_tracing() and rows.dim() == 3:  # never while fx traces (IdLayout is flat then)
            if self.live is None:
                return rows.transpose(0, 1).reshape(-1), self._lengths(features, copies)
            rows = rows.flatten(1)
        if copies == 1:
            return rows[0], features.lengths()
        values = copies_per_feature(rows, features.length_per_key(), self.copies, False)  # copy 0's ids, copy 1's..
        return values, self._lengths(features, copies)

    def _lengths(self, features: KeyedJaggedTensor, copies: int) -> torch.Tensor:
        """Bag lengths of the fanned-out KJT: each feature's lengths once per copy, zero for muted copies."""
        lengths = features.lengths().view(len(self.features), -1).repeat_interleave(copies, dim=0)
        if self.live is not None:
            lengths = lengths * self.live.to(lengths.device).unsqueeze(1)
        return lengths.reshape(-1)

    def live_columns(self, dims: list[int]) -> torch.Tensor | None:
        """Columns of the pooled ``(B, sum_f k * d_f)`` output that belong to live copies (None: all are live)."""
        if self.live is None:
            return None
        starts = [self.most * sum(dims[:i]) for i in range(len(dims))]
        return torch.tensor(
            [s + c * d + j for s, d, k in zip(starts, dims, self.copies) for c in range(k) for j in range(d)]
        )


class BatchFanOut(FanOut):
    """Like :class:`FanOut` with ``k`` copies of every feature, but each copy stays in its logical feature as a block
    of bags: bag ``c * B + b`` of feature ``f`` holds copy ``c`` of bag ``b``'s ids, and the KJT's stride is ``k * B``.

    Values and lengths are exactly :class:`FanOut`'s (only the keys and stride differ), and the pooled
    ``(k * B, sum d)`` output views as ``(k, B, sum d)``: each copy pooled on its own, as with ``k`` features. fbgemm's
    CPU kernels run faster on ``F`` features of ``k * B`` bags than on ``k * F`` features of ``B`` bags (measured,
    26 features, batch 4096, ``k = 2``, forward + backward with row-wise Adagrad: 6.1 ms vs 9.1 ms).
    """

    def __init__(self, features: list[str], copies: int) -> None:
        super().__init__(features, [copies] * len(features))
        self.keys = list(features)

    def __call__(self, features: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
        values, lengths = self.fan(features, rows)
        return make_kjt(self.keys, values, lengths, features.stride() * self.most)


def as_one_feature(features: KeyedJaggedTensor, key: str) -> KeyedJaggedTensor:
    """A KJT's ``F`` features as ``F`` blocks of bags of one feature ``key`` (stride ``F * B``, same values/lengths).

    For a table read by several features: fbgemm's CPU backward takes its fast row-wise path only when one feature
    reads a table, and the pooled ``(F * B, d)`` output views back as ``(F, B, d)``.
    """
    return _as_one_feature(features, key)


@torch.fx.wrap
def _as_one_feature(features: KeyedJaggedTensor, key: str) -> KeyedJaggedTensor:
    """:func:`as_one_feature`'s body, an fx leaf (it reads the number of keys)."""
    stride = features.stride() * len(features.keys())
    return KeyedJaggedTensor(keys=[key], values=features.values(), lengths=features.lengths(), stride=stride)


def blocks_side_by_side(pooled: torch.Tensor, batch: int) -> torch.Tensor:
    """Undo :func:`as_one_feature` on the pooled ``(F * B, d)`` rows: ``(B, F * d)``, block ``f`` in columns ``f``."""
    return pooled.view(-1, batch, pooled.shape[1]).transpose(0, 1).reshape(batch, -1)


def bag_sums(rows: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
    """Sum pooling of one feature: ``rows`` (one per id, bags in order) summed per bag of ``lengths`` -> ``(B, d)``."""
    owner = torch.arange(batch, device=rows.device).repeat_interleave(lengths, output_size=rows.shape[0])
    return rows.new_zeros((batch, rows.shape[1])).index_add(0, owner, rows)


def keyed(values: torch.Tensor, keys: list[str], dims: list[int]) -> KeyedTensor:
    """A ``KeyedTensor`` with the logical keys and dims over ``values`` of shape ``(B, sum(dims))``."""
    return KeyedTensor(keys=keys, length_per_key=dims, values=values)


class BagFold:
    """Rewrites a KJT so that each id of feature ``f`` appears ``k_f`` times *in its own bag* (once per hash).

    For methods that sum their ``k`` rows (multi-hash, QR ``add``), sum pooling over the enlarged bag is exactly
    the sum over ids of the sum of their ``k`` rows, so one fbgemm lookup does lookup, combine and pooling with no
    extra output columns. ``rows[c, i]`` is copy ``c`` of id ``i``; copies at or beyond ``k_f`` are left out. Each
    id expands in place into its ``k_f`` rows, so bags stay contiguous and only their lengths scale by ``k_f``.
    """

    def __init__(self, features: list[str], copies: list[int]) -> None:
        self.features, self.copies = list(features), torch.tensor(copies)
        self._copies = list(copies)

    def __call__(self, features: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
        rows = rows.flatten(1)  # (k, F, L) -> (k, N)
        values = copies_per_feature(rows, features.length_per_key(), self._copies, True)  # id i -> its k rows
        lengths = features.lengths().view(len(self.features), -1) * self.copies.to(rows.device).unsqueeze(1)
        return make_kjt(self.features, values, lengths.reshape(-1), features.stride())

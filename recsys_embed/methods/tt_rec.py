"""``tt_rec``: tensor-train embeddings: each large table is a chain of three small cores, its rows computed per batch.

Idea (Yin et al., MLSys'21, "TT-Rec: Tensor Train Compression for Deep Learning Recommendation Model
Embeddings"): view an ``n x d`` table as a tensor with modes ``(n1, n2, n3)`` for the rows (``n1 n2 n3 >= n``, a
little padding) and ``(d1, d2, d3)`` for the dims (``d1 d2 d3 = d``, e.g. ``16 = 2 * 2 * 4``), and store it in
tensor-train form: three cores ``G_k`` of shape ``(r_{k-1}, n_k, d_k, r_k)``, ``r_0 = r_3 = 1``, ``r_1 = r_2 = r``
(the ``rank``). Id ``x = (i1 * n3 + i3) * n2 + i2`` has the row ``G1[:, i1] x G2[:, i2] x G3[:, i3]`` reshaped to
``d``. A batch computes the rows of its unique ids with two batched matmuls (the middle core applied per slice to
the ids grouped by ``i2``, :func:`tt_rows`) and sums them per bag (``embedding_bag`` over the batch's rows), as a
full ``EmbeddingBagCollection`` would. The cores are small dense parameters (trained by the dense optimizer,
replicated under sharding); tables where TT saves nothing stay plain TorchRec tables (fused, sharded).

Factors (:func:`dim_factors`, :func:`row_factors`): balanced, ``d``'s exact, ``n``'s with the smallest possible
largest factor (``ceil(n^(1/3))``) and then the least padding; the smallest factors go to the middle core, whose
``r^2`` term dominates. Initialisation, the paper's sampled Gaussian idea: every core entry is drawn from
``N(0, s_k^2)`` with ``s_1^2 = v^(1/3)``, ``s_2^2 = s_3^2 = v^(1/3) / r``, so each row entry (a sum of ``r^2``
products) has variance ``v = 1 / (3n)``, that of TorchRec's default ``U(-1/sqrt(n), 1/sqrt(n))`` full table.

Memory: ``sum_{t in TT} (n1 d1 r + r n2 d2 r + r n3 d3) * 4 + sum_{t kept full} n_t * d_t * 4`` bytes. With
``full_tables=None`` a table is TT when that saves bytes at the given rank, else kept full; a list names the tables
kept full (``[]``: every table TT). The budget solver picks the largest ``rank`` that fits.

Example::

    emb = build_embedding("tt_rec", tables, budget=Budget(ratio=100))
    emb = build_embedding("tt_rec", tables, rank=32, full_tables=["t_small"])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn
from torch.nn.functional import embedding_bag
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import FP32_BYTES, Budget, EmbeddingMethod, check_tables, full_bytes
from recsys_embed.methods.layouts import keyed
from recsys_embed.methods.registry import register
from recsys_embed.methods.solvers import ceil_root, largest_fitting

log = logging.getLogger(__name__)
Factors = tuple[int, int, int]


def _middle_smallest(factors: Sequence[int]) -> Factors:
    """Sorted ``(a, b, c)`` as ``(b, a, c)``: the smallest factor on the middle core (its ``r^2`` term)."""
    a, b, c = sorted(factors)
    return b, a, c


def dim_factors(d: int) -> Factors:
    """Three factors with product exactly ``d``, the most balanced (smallest sum): ``16 -> (2, 2, 4)``."""
    triples = [(a, b, d // (a * b)) for a in range(1, d + 1) if d % a == 0 for b in range(a, d + 1) if d % (a * b) == 0]
    return _middle_smallest(min(triples, key=lambda f: (sum(f), max(f))))


def row_factors(n: int) -> Factors:
    """Three factors with product ``>= n``: the largest no more than ``m = ceil(n^(1/3))`` (the most balanced
    possible), then the least padding ``n1 n2 n3 - n``, then the smallest sum: ``1000 -> (10, 10, 10)``,
    ``3000 -> (15, 14, 15)``. Only factors ``>= n / m^2`` can be the smallest, so the search is a few steps."""
    m = ceil_root(n, 3)
    best: tuple[int, int, Factors] | None = None
    for a in range(max(1, -(-n // (m * m))), m + 1):
        for b in range(max(a, -(-n // (a * m))), m + 1):
            c = -(-n // (a * b))
            if c <= m and (best is None or (a * b * c, a + b + c) < best[:2]):
                best = (a * b * c, a + b + c, (a, b, c))
    assert best is not None  # (m, m, m) always qualifies
    return _middle_smallest(best[2])


def tt_bytes(n: int, d: int, rank: int) -> int:
    """Bytes of one table's three cores at ``rank``: ``(n1 d1 r + r n2 d2 r + r n3 d3) * 4``."""
    (n1, n2, n3), (d1, d2, d3) = row_factors(n), dim_factors(d)
    return (n1 * d1 * rank + rank * n2 * d2 * rank + rank * n3 * d3) * FP32_BYTES


def is_tt(table: EmbeddingBagConfig, rank: int, full_tables: Sequence[str] | None) -> bool:
    """Whether ``table`` is stored as TT cores: named explicitly, or (``full_tables=None``) when that saves bytes."""
    if full_tables is not None:
        return table.name not in full_tables
    return tt_bytes(table.num_embeddings, table.embedding_dim, rank) < full_bytes([table])


def tt_rec_bytes(tables: Sequence[EmbeddingBagConfig], rank: int, full_tables: Sequence[str] | None) -> int:
    """The memory formula: the TT tables' cores plus the tables kept full."""
    return sum(
        tt_bytes(t.num_embeddings, t.embedding_dim, rank) if is_tt(t, rank, full_tables) else full_bytes([t])
        for t in tables
    )


def tt_digits(ids: torch.Tensor, n2: int, n3: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits ``(i1, i2, i3)`` of ``ids``, ``x = (i1 * n3 + i3) * n2 + i2``: the middle core's digit is the least
    significant, so a run of consecutive ids (as frequent ids often are) spreads evenly over the middle slices."""
    rest = torch.div(ids, n2, rounding_mode="floor")
    i1 = torch.div(rest, n3, rounding_mode="floor")
    return i1, ids - rest * n2, rest - i1 * n3


def tt_rows(cores: Sequence[torch.Tensor], ids: torch.Tensor, n2: int, n3: int) -> torch.Tensor:
    """``(len(ids), d)``: the rows ``G1[:, i1] x G2[:, i2] x G3[:, i3]`` of ``ids``, with no per-id copy of the
    middle core (``r^2`` values): ids go to a padded layout grouped by ``i2`` (``(n2, most, ...)``, ``most`` the
    largest group), so one batched matmul reads each middle slice once; the outer cores are gathered per id. The
    padding is ``n2 * most - len(ids)`` rows of ``d1 * r`` values (none when the ids spread evenly over the slices,
    ``(n2 - 1) * len(ids)`` when all share one)."""
    g1, g2, g3 = cores
    (_, n1, d1, r1), (_, _, d2, r2), d3, count = g1.shape, g2.shape, g3.shape[2], ids.numel()
    i1, i2, i3 = tt_digits(ids, n2, n3)
    sizes = torch.zeros(n2, dtype=torch.int64, device=ids.device).index_add_(0, i2, torch.ones_like(i2))
    most = sizes.max().item()  # (an unbacked size under torch.export)
    order = torch.argsort(i2, stable=True)
    rank_in_group = torch.arange(count, device=ids.device) - (torch.cumsum(sizes, 0) - sizes)[i2[order]]
    slot = torch.empty_like(i2).index_copy_(0, order, i2[order] * most + rank_in_group)  # each id's padded row
    first = g1[0].reshape(n1, d1 * r1).index_select(0, i1)  # (U, d1 r1)
    padded = first.new_zeros(n2 * most, d1 * r1).index_copy(0, slot, first)
    middle = g2.transpose(0, 1).reshape(n2, r1, d2 * r2)  # one copy of the core, not one per id
    both = torch.bmm(padded.view(n2, most * d1, r1), middle).view(n2 * most, d1 * d2 * r2).index_select(0, slot)
    last = g3[..., 0].transpose(0, 1).reshape(n3, r2 * d3).index_select(0, i3).view(count, r2, d3)
    return torch.bmm(both.view(count, d1 * d2, r2), last).reshape(count, d1 * d2 * d3)


@torch.fx.wrap
def pooled_tt(
    cores: list[torch.Tensor],
    values: torch.Tensor,
    lengths: torch.Tensor,
    per_key: list[int],
    first: int,
    end: int,
    batch: int,
    radix: list[int],
) -> torch.Tensor:
    """``(B, count * d)``: features ``first .. end - 1`` (one TT table) summed per bag. Rows are computed once per
    unique id of the batch, then ``embedding_bag`` gathers them per occurrence and sums each bag (an fx leaf: the
    table's ids are a slice whose bounds depend on the lengths)."""
    ids = values[sum(per_key[:first]) : sum(per_key[:end])]
    unique, inverse = torch.unique(ids, return_inverse=True)
    rows = tt_rows(cores, unique, radix[0], radix[1])
    bag_lengths = lengths[first * batch : end * batch]
    offsets = torch.zeros(bag_lengths.numel() + 1, dtype=torch.int64, device=values.device)
    offsets[1:] = torch.cumsum(bag_lengths, 0)
    pooled = embedding_bag(inverse, rows, offsets, mode="sum", include_last_offset=True)  # feature-major bags
    return pooled.view(end - first, batch, rows.shape[1]).transpose(0, 1).reshape(batch, (end - first) * rows.shape[1])


@register("tt_rec")
class TTRecEmbedding(EmbeddingMethod):
    """Three TT cores per large table (rank ``r``), rows contracted per batch; small tables stay full."""

    budget_knobs = ("rank",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        rank: int,
        full_tables: Sequence[str] | None = None,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        if rank < 1:
            raise ValueError(f"Method 'tt_rec' needs rank >= 1 (got {rank}).")
        names = [t.name for t in self._tables]
        unknown = sorted(set(full_tables or ()) - set(names))
        if unknown:
            raise ValueError(f"Method 'tt_rec': full_tables names unknown tables {unknown}; the tables are {names}.")
        self.rank = rank
        dev = torch.device(device or "cpu")
        tt = [t for t in self._tables if is_tt(t, rank, full_tables)]
        self.tt_tables = [t.name for t in tt]
        self.factors = {t.name: (row_factors(t.num_embeddings), dim_factors(t.embedding_dim)) for t in tt}
        self.cores = nn.ModuleDict({t.name: self._init_cores(t, dev) for t in tt})
        full = [t for t in self._tables if t.name not in self.cores]
        self.kept_full = [t.name for t in full]
        if full:
            self.tables = self.add_tables("tables", full, device=dev)
        self._full_features = [i for i, f in enumerate(self._feature_names) if self._table_of[f] in self.kept_full]
        # the output in table order: a TT table's features (name, first, end) or a full one's columns (None, ...)
        self._segments: list[tuple[str | None, int, int]] = []
        feature = column = 0
        for t in self._tables:
            count = len(t.feature_names)
            if t.name in self.cores:
                self._segments.append((t.name, feature, feature + count))
            else:
                self._segments.append((None, column, column + count * t.embedding_dim))
                column += count * t.embedding_dim
            feature += count

    def _init_cores(self, table: EmbeddingBagConfig, device: torch.device) -> nn.ParameterList:
        """Gaussian cores whose product has the variance ``1 / (3n)`` of TorchRec's default full-table init."""
        (n1, n2, n3), (d1, d2, d3), r = *self.factors[table.name], self.rank
        s2 = (1.0 / (3 * table.num_embeddings)) ** (1 / 3)  # a row entry sums r^2 products: r^2 s2^3 / r^2 = 1 / (3n)
        shapes_and_variances = [((1, n1, d1, r), s2), ((r, n2, d2, r), s2 / r), ((r, n3, d3, 1), s2 / r)]
        return nn.ParameterList(
            nn.Parameter(torch.empty(shape, device=device).normal_(0.0, math.sqrt(var)))
            for shape, var in shapes_and_variances
        )

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        values, lengths, batch = features.values(), features.lengths(), features.stride()
        full = None
        if self._full_features:
            every = len(self._full_features) == len(self._feature_names)
            full = self.tables(features if every else features.permute(self._full_features)).values()
        pieces = []
        for name, first, end in self._segments:
            if name is None:
                pieces.append(full[:, first:end])  # type: ignore[index]
            else:
                (_, n2, n3), _ = self.factors[name]
                cores = list(self.cores[name])
                pieces.append(pooled_tt(cores, values, lengths, features.length_per_key(), first, end, batch, [n2, n3]))
        out = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        return keyed(out, self._feature_names, self._length_per_key)

    def memory_bytes(self) -> int:
        return tt_rec_bytes(self._tables, self.rank, self.kept_full)

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> TTRecEmbedding:
        """The largest ``rank`` whose bytes fit (bytes grow with the rank; past ``max_k n_k d_k`` of every table,
        above its exact TT ranks, a larger rank adds nothing)."""
        tables = check_tables(tables)
        allowed, full = budget.max_bytes(tables), full_bytes(tables)
        keep = cls.with_defaults(options)["full_tables"]
        factors = [zip(row_factors(t.num_embeddings), dim_factors(t.embedding_dim)) for t in tables]
        top = max(n * d for pairs in factors for n, d in pairs)
        smallest, largest = tt_rec_bytes(tables, 1, keep), tt_rec_bytes(tables, top, keep)
        if smallest > allowed:
            raise ValueError(
                f"Method 'tt_rec' cannot fit {allowed} bytes (ratio {full / allowed:.1f}): rank 1 already needs "
                f"{smallest} bytes, so on these tables it reaches ratios {full / largest:.1f}x to "
                f"{full / smallest:.1f}x. Ask for at least {smallest} bytes (a ratio of at most "
                f"{full / smallest:.1f}), or use a method whose rows are shared (e.g. 'hash')."
            )
        rank = largest_fitting(lambda r: tt_rec_bytes(tables, r, keep) <= allowed, 1, top)
        method = cls(tables, **{**options, "rank": rank})  # type: ignore[arg-type]
        reached = method.compression_ratio()
        log.info(
            "tt_rec: rank=%d, TT tables %s, reaches ratio %.2f (asked %s)", rank, method.tt_tables, reached, budget
        )
        return method

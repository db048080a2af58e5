"""``dhe``: deep hash embedding: ``k`` universal hashes of the id, made dense, decoded by an MLP; no table.

Idea (Kang et al., KDD'21, "Learning to Embed Categorical Features without Embedding Tables for Recommendation"):
id ``x`` is encoded by ``k`` universal hashes ``h_i(x) = ((a_i * x + b_i) mod p) mod m`` (``p = 2^31 - 1``, a
Mersenne prime: products fit int64 and ``mod p`` is shifts and masks), each bucket made a real number (``uniform``:
``2 h / (m - 1) - 1`` in ``[-1, 1]``; ``gaussian``: Box-Muller on pairs of hashes), and an MLP (``k -> width ->
... -> d``, Mish activations) decodes that vector into the embedding. The decoder runs once per *unique* id of a
table in the batch; the bags are then pooled with ``embedding_bag`` over the decoded rows. Defaults follow the
VLDB'24 benchmark (Zhang et al., arXiv 2311.15578): ``k = 1024``, ``m = 10^6``, uniform. Unlike the paper, the
decoder has no batch norm (a served embedding must not depend on the rest of the batch). One decoder per table
(the paper); one set of ``k`` hashes for all tables (``3k`` multipliers and ``k`` offsets, int64 buffers). As in
the benchmark's per-table mode, a table whose full rows take no more bytes than a decoder keeps its rows (a
TorchRec table), unless ``keep_small_tables=False``.

Any int64 id >= 0 hashes exactly, without overflow, also above the declared cardinality: an id is written in
base ``p``, ``x = x0 + x1 p + x2 p^2``, and hashed as the vector ``(a0_i x0 + a1_i x1 + a2_i x2 + b_i) mod p``
(Carter-Wegman; for ids below ``p`` exactly the paper's hash), so no structured aliasing (``x`` vs ``x + p``):
distinct ids get distinct encodings with overwhelming probability.

Memory: ``8 * 4k + sum_t min(n_t d_t, k w + w + (L - 1)(w^2 + w) + w d_t + d_t) * 4`` bytes: the hash
parameters, then per table its rows or its decoder of ``L = hidden_layers`` layers of width ``w`` (with
``keep_small_tables=False`` every table pays the decoder). The budget solver picks the largest ``width`` that fits.

Cost: a train step is dominated by the encoding (``~20`` int64 passes over a ``(unique ids, k)`` array) and the
decoder's first layer (``unique ids x k x width`` multiply-adds, forward and backward).

Example::

    emb = build_embedding("dhe", tables, budget=Budget(ratio=10))
    emb = build_embedding("dhe", tables, width=64, num_hashes=256, distribution="gaussian")
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import FP32_BYTES, INT64_BYTES, Budget, EmbeddingMethod, check_tables, full_bytes
from recsys_embed.methods.hash_fn import reference_hash64
from recsys_embed.methods.layouts import keyed, make_kjt
from recsys_embed.methods.registry import register
from recsys_embed.methods.solvers import largest_fitting

log = logging.getLogger(__name__)
PRIME = (1 << 31) - 1  # Mersenne: x mod p = (x & p) + (x >> 31), folded


def hash_parameters(num_hashes: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Multipliers ``a[j][i]`` in ``[1, p)`` (one per base-``p`` digit ``j`` of the id) and offsets ``b[i]`` in
    ``[0, p)``, from seeded SplitMix64 (stable across processes and versions)."""
    a = [
        [(reference_hash64(i, 4 * seed + j) & (2**63 - 1)) % (PRIME - 1) + 1 for i in range(num_hashes)]
        for j in range(3)
    ]
    b = [(reference_hash64(i, 4 * seed + 3) & (2**63 - 1)) % PRIME for i in range(num_hashes)]
    return a, b


def reference_buckets(x: int, a: Sequence[Sequence[int]], b: Sequence[int], buckets: int) -> list[int]:
    """Pure-Python ``((a0_i x0 + a1_i x1 + a2_i x2 + b_i) mod p) mod m`` for ``x = x0 + x1 p + x2 p^2`` (digits
    below ``p``), the definition :func:`hash_buckets` is tested on; for ``x < p``: ``((a0_i x + b_i) mod p) mod m``."""
    digits = (x % PRIME, x // PRIME % PRIME, x // PRIME**2)
    return [(sum(aj[i] * d for aj, d in zip(a, digits)) + b[i]) % PRIME % buckets for i in range(len(b))]


@torch.fx.wrap
def hash_buckets(ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buckets: int) -> torch.Tensor:
    """``(U, k)`` int64 buckets of ids ``(U,)`` >= 0 (:func:`reference_buckets`), exact int64, in-place passes.

    Bounds: digits and multipliers are below ``p`` and ``x2 <= 2``, so the sum is below ``2 p^2 < 2^63``; two
    Mersenne folds leave at most ``p + 2``, an exact step gives ``mod p``, and Barrett's multiply-shift ``mod m``.
    """
    quotient = ids.div(PRIME, rounding_mode="floor")
    digits = (ids - quotient * PRIME, quotient.remainder(PRIME), quotient.div(PRIME, rounding_mode="floor"))
    s = digits[0].unsqueeze(1) * a[0]  # <= (p - 1)^2
    s += b
    t = torch.mul(digits[1].unsqueeze(1), a[1])
    s += t
    torch.mul(digits[2].unsqueeze(1), a[2], out=t)
    s += t  # < 2 p^2 < 2^63
    for _ in range(2):  # (s & p) + (s >> 31) == s (mod p): <= p + 2^32, then <= p + 2
        torch.bitwise_right_shift(s, 31, out=t)
        s &= PRIME
        s += t
    torch.add(s, 1, out=t)  # exact mod p for s <= 2p: (s + ((s + 1) >> 31)) & p
    t >>= 31
    s += t
    s &= PRIME
    shift = 31 + max(1, math.ceil(math.log2(buckets)))  # Barrett: floor(s / m) = (s * ceil(2^shift / m)) >> shift
    torch.mul(s, -(-(1 << shift) // buckets), out=t)  # < 2^31 * 2^32: no overflow
    t >>= shift
    t *= buckets
    return s.sub_(t)


def encode(ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buckets: int, distribution: str) -> torch.Tensor:
    """``(U, k)`` float32 dense encoding: uniform in ``[-1, 1]``, or standard normal via Box-Muller on hash pairs."""
    h = hash_buckets(ids, a, b, buckets).to(torch.float32)
    if distribution == "uniform":
        return h.mul_(2.0 / max(buckets - 1, 1)).sub_(1.0)
    u = h.add_(1.0).div_(buckets + 1.0)  # in (0, 1)
    radius, angle = (-2.0 * u[:, 0::2].log()).sqrt(), (2.0 * math.pi) * u[:, 1::2]
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=2).flatten(1)


def decoder_params(k: int, width: int, layers: int, dim: int) -> int:
    """Parameters of ``k -> width (x layers) -> dim`` with biases."""
    return k * width + width + (layers - 1) * (width * width + width) + width * dim + dim


@register("dhe")
class DeepHashEmbedding(EmbeddingMethod):
    """``k`` universal hashes -> dense vector -> MLP decoder per table; small tables keep their rows."""

    budget_knobs = ("width",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        width: int,
        num_hashes: int = 1024,
        buckets: int = 1_000_000,
        hidden_layers: int = 2,
        distribution: Literal["uniform", "gaussian"] = "uniform",
        keep_small_tables: bool = True,
        seed: int = 0,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        rules = {
            "width >= 1": width >= 1,
            "num_hashes >= 1": num_hashes >= 1,
            "hidden_layers >= 1": hidden_layers >= 1,
            f"2 <= buckets <= {PRIME}": 2 <= buckets <= PRIME,
            "an even num_hashes with distribution='gaussian' (Box-Muller pairs)": (
                distribution != "gaussian" or num_hashes % 2 == 0
            ),
        }
        for rule, ok in rules.items():
            if not ok:
                raise ValueError(
                    f"Method 'dhe' needs {rule} (got width={width}, num_hashes={num_hashes}, buckets={buckets}, "
                    f"hidden_layers={hidden_layers}, distribution={distribution!r})."
                )
        self.width, self.num_hashes, self.buckets, self.hidden_layers = width, num_hashes, buckets, hidden_layers
        self.distribution, self.keep_small_tables = distribution, keep_small_tables
        dev = torch.device(device or "cpu")
        self.decoded = [
            not self.keeps_rows(t, num_hashes, width, hidden_layers, keep_small_tables) for t in self._tables
        ]
        kept = [t for t, dec in zip(self._tables, self.decoded) if not dec]
        self.unbounded_features = {f for t, dec in zip(self._tables, self.decoded) if dec for f in t.feature_names}
        a, b = hash_parameters(num_hashes, seed)
        self.register_buffer("hash_a", torch.tensor(a, dtype=torch.int64, device=dev))  # (3, k)
        self.register_buffer("hash_b", torch.tensor(b, dtype=torch.int64, device=dev))
        self.decoders = nn.ModuleDict(
            {t.name: self._decoder(t.embedding_dim, dev) for t, dec in zip(self._tables, self.decoded) if dec}
        )
        self.tables = self.add_tables("tables", kept, device=dev) if kept else None
        self._kept_keys = [f for t in kept for f in t.feature_names]
        self._features_per_table = [len(t.feature_names) for t in self._tables]

    def _decoder(self, dim: int, device: torch.device) -> nn.Sequential:
        sizes = [self.num_hashes] + [self.width] * self.hidden_layers
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out, device=device), nn.Mish()]
        return nn.Sequential(*layers, nn.Linear(self.width, dim, device=device))

    @staticmethod
    def keeps_rows(table: EmbeddingBagConfig, k: int, width: int, layers: int, keep_small_tables: bool) -> bool:
        """Whether ``table`` keeps its full rows: they take no more bytes than its decoder would."""
        full = table.num_embeddings * table.embedding_dim
        return keep_small_tables and full <= decoder_params(k, width, layers, table.embedding_dim)

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        batch = features.stride()
        pieces = _per_table(features, self._features_per_table)  # indexed, not unpacked: an fx proxy has no length
        values, lengths = pieces[0], pieces[1]
        blocks: dict[int, torch.Tensor] = {}
        kept = [t for t, decoded in enumerate(self.decoded) if not decoded]
        if self.tables is not None:  # one lookup for every table that keeps its rows
            ids, bags = torch.cat([values[t] for t in kept]), torch.cat([lengths[t] for t in kept])
            widths = [self._tables[t].embedding_dim * self._features_per_table[t] for t in kept]
            pooled = self.tables(make_kjt(self._kept_keys, ids, bags, batch)).values().split(widths, dim=1)
            blocks.update({t: pooled[i] for i, t in enumerate(kept)})
        for t, table in enumerate(self._tables):
            if self.decoded[t]:
                distinct = torch.unique(values[t], return_inverse=True)  # decode each distinct id once
                unique, inverse = distinct[0], distinct[1]
                code = encode(unique, self.hash_a, self.hash_b, self.buckets, self.distribution)
                offsets = F.pad(lengths[t].cumsum(0), (1, 0))
                rows = F.embedding_bag(
                    inverse, self.decoders[table.name](code), offsets, mode="sum", include_last_offset=True
                )
                blocks[t] = rows.view(-1, batch, table.embedding_dim).transpose(0, 1).reshape(batch, -1)
        return keyed(
            torch.cat([blocks[t] for t in range(len(self._tables))], dim=1), self._feature_names, self._length_per_key
        )

    def memory_bytes(self) -> int:
        return self.dhe_bytes(self._tables, self.num_hashes, self.width, self.hidden_layers, self.keep_small_tables)

    @classmethod
    def dhe_bytes(cls, tables: Sequence[EmbeddingBagConfig], k: int, width: int, layers: int, keep: bool) -> int:
        """The memory formula for a given ``width`` (used by the budget solver)."""
        rows = sum(
            t.num_embeddings * t.embedding_dim
            if cls.keeps_rows(t, k, width, layers, keep)
            else decoder_params(k, width, layers, t.embedding_dim)
            for t in tables
        )
        return 4 * k * INT64_BYTES + rows * FP32_BYTES

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> DeepHashEmbedding:
        tables = check_tables(tables)
        o = cls.with_defaults(options)
        k, layers, keep = int(o["num_hashes"]), int(o["hidden_layers"]), bool(o["keep_small_tables"])
        allowed, full = budget.max_bytes(tables), full_bytes(tables)
        smallest = cls.dhe_bytes(tables, k, 1, layers, keep)
        if smallest > allowed and smallest >= full:
            raise ValueError(
                f"Method 'dhe' cannot compress these tables: width 1 with {k} hashes already needs {smallest} bytes, "
                f"more than the full tables' {full}. Use fewer num_hashes (the hashes' parameters are {4 * k * 8} "
                "bytes), or another method for tables this small."
            )
        if smallest > allowed:
            raise ValueError(
                f"Method 'dhe' cannot fit {allowed} bytes (ratio {full / allowed:.1f}): width 1 with {k} hashes "
                f"already needs {smallest} bytes, so it reaches ratios 1 to {full / smallest:.1f} on these tables. "
                "Ask for a budget of at least that many bytes, or fewer num_hashes."
            )
        high = 1 << 20  # beyond this every table keeps its rows, or the decoders exceed any budget
        width = largest_fitting(lambda w: cls.dhe_bytes(tables, k, w, layers, keep) <= allowed, 1, high)
        method = cls(tables, width=width, **options)  # type: ignore[arg-type]
        log.info("dhe: width=%d reaches ratio %.2f (asked %s)", width, method.compression_ratio(), budget)
        return method


@torch.fx.wrap
def _per_table(features: KeyedJaggedTensor, per_table: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each table's ids (its features' values, feature-major) and bag lengths (``(F_t * B,)``); an fx leaf."""
    counts, start = features.length_per_key(), 0
    sizes = []
    for n in per_table:
        sizes.append(sum(counts[start : start + n]))
        start += n
    bags = [n * features.stride() for n in per_table]
    return list(features.values().split(sizes)), list(features.lengths().split(bags))

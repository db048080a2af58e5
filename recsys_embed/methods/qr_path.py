"""``qr_path``: path-based compositional embeddings: the remainder picks a linear map applied to the quotient row.

Idea (Shi et al., KDD'20, "Compositional Embeddings Using Complementary Partitions", section 4.2, path-based
compositional embeddings): instead of combining the two partitions' vectors elementwise, the quotient ``x // b``
reads a row ``q`` of a table, and the remainder ``x % b`` chooses a small function (here a ``d x d`` linear map
``W_r``) applied to it: ``e(x) = W_{x % b} q_{x // b}``. Complementary partitions keep every id's path unique.

Both parts are plain TorchRec tables, so they train on fbgemm and shard like full tables: the maps are rows of a
``b x d^2`` table (one flattened matrix per row), the quotient rows a ``ceil(n / b) x d`` table. As with ``qr``'s
``mult`` (and the authors' DLRM code), each part is pooled over the bag before combining; for one id per bag that
is exactly ``W_r q``. The maps start at the identity, so the initial vectors have a full table's scale.

Memory: ``sum_t (b_t * d^2 + ceil(n_t / b_t) * d) * 4`` bytes. The budget solver caps the bytes of every table and
picks, per table, the smallest base (fewest collisions) under the cap.

Example::

    emb = build_embedding("qr_path", tables, budget=Budget(ratio=10))
    emb = build_embedding("qr_path", tables, collisions=8)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import FP32_BYTES, Budget, EmbeddingMethod, check_tables, full_bytes
from recsys_embed.methods.registry import register
from recsys_embed.methods.remap import FanOut, keyed, largest_fitting, value_features

log = logging.getLogger(__name__)


def path_bytes(n: int, d: int, base: int) -> int:
    """Bytes of one table: ``base`` maps of ``d x d`` plus ``ceil(n / base)`` quotient rows of ``d``."""
    return (base * d * d + -(-n // base) * d) * FP32_BYTES


def smallest_path_base(n: int, d: int, cap: int) -> int | None:
    """The smallest base whose bytes fit ``cap`` (bytes fall until ``base ~ sqrt(n / d)``), or None."""
    for base in range(1, math.isqrt(max(1, n // d)) + 2):
        if path_bytes(n, d, base) <= cap:
            return base
    return None


@register("qr_path")
class QRPathEmbedding(EmbeddingMethod):
    """``e(x) = W_{x % b} q_{x // b}``: per-remainder ``d x d`` maps on quotient rows."""

    budget_knobs = ("collisions",)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        collisions: int | Sequence[int] = 4,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        bases = [collisions] * len(self._tables) if isinstance(collisions, int) else list(collisions)
        if len(bases) != len(self._tables) or min(bases) < 1:
            raise ValueError(
                f"Method 'qr_path': collisions must be >= 1, one value or one per table (got {collisions})."
            )
        if any(t.embedding_dim % 2 for t in self._tables):
            raise ValueError("Method 'qr_path' needs even embedding dims (each map is a d*d row, a multiple of 4).")
        self.bases = bases
        self.fan_out = FanOut(self._feature_names, [2] * len(self._feature_names))
        physical = []
        for t, base in zip(self._tables, bases):
            maps, quotients = [f"{f}@0" for f in t.feature_names], [f"{f}@1" for f in t.feature_names]
            d = t.embedding_dim
            physical.append(
                EmbeddingBagConfig(name=f"{t.name}@maps", num_embeddings=base, embedding_dim=d * d, feature_names=maps)
            )
            physical.append(
                EmbeddingBagConfig(
                    name=f"{t.name}@rows",
                    num_embeddings=-(-t.num_embeddings // base),
                    embedding_dim=d,
                    feature_names=quotients,
                )
            )
        dev = torch.device(device or "cpu")
        self.tables = EmbeddingBagCollection(tables=physical, device=dev)
        base_of = {f: b for t, b in zip(self._tables, bases) for f in t.feature_names}
        self.register_buffer(
            "base", torch.tensor([base_of[f] for f in self._feature_names], device=dev), persistent=False
        )
        with torch.no_grad():
            for t in self._tables:
                d, bound = t.embedding_dim, math.sqrt(1.0 / t.num_embeddings)
                identity = torch.eye(d, device=dev).reshape(-1)
                self.tables.embedding_bags[f"{t.name}@maps"].weight.copy_(
                    identity.expand_as(self.tables.embedding_bags[f"{t.name}@maps"].weight)
                )
                self.tables.embedding_bags[f"{t.name}@rows"].weight.uniform_(-bound, bound)

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Physical KJT: ``f@0`` reads the map ``x % b``, ``f@1`` the quotient row ``x // b``."""
        base = self.base[value_features(features)]
        values = features.values()
        rows = torch.stack([torch.remainder(values, base), torch.div(values, base, rounding_mode="floor")])
        return self.fan_out(features, rows)

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.tables(self.remap(features)).values()
        batch, dims = pooled.shape[0], self._length_per_key
        parts = torch.split(pooled, [p for d in dims for p in (d * d, d)], dim=1)
        out = [
            torch.bmm(maps.view(batch, d, d), rows.unsqueeze(2)).squeeze(2)
            for maps, rows, d in zip(parts[0::2], parts[1::2], dims)
        ]
        return keyed(torch.cat(out, dim=1), self._feature_names, dims)

    def memory_bytes(self) -> int:
        return sum(path_bytes(t.num_embeddings, t.embedding_dim, b) for t, b in zip(self._tables, self.bases))

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> QRPathEmbedding:
        tables = check_tables(tables)
        allowed = budget.max_bytes(tables)

        def bases_for(cap: int) -> list[int | None]:
            return [smallest_path_base(t.num_embeddings, t.embedding_dim, cap) for t in tables]

        def total(bases: list[int | None]) -> int:
            return sum(path_bytes(t.num_embeddings, t.embedding_dim, b) for t, b in zip(tables, bases))  # type: ignore[arg-type]

        floor_cap = max(
            min(
                path_bytes(t.num_embeddings, t.embedding_dim, b)
                for b in range(1, math.isqrt(max(1, t.num_embeddings // t.embedding_dim)) + 2)
            )
            for t in tables
        )
        smallest = total(bases_for(floor_cap))
        if smallest > allowed:
            raise ValueError(
                f"Method 'qr_path' cannot fit {allowed} bytes: the budget solver (one byte cap for all tables) reaches "
                f"at least {smallest} bytes (ratio {full_bytes(tables) / smallest:.1f}). Ask for at least {smallest} "
                "bytes, or set per-table collisions=[...]."
            )
        most = max(path_bytes(t.num_embeddings, t.embedding_dim, 1) for t in tables)
        cap = largest_fitting(lambda c: total(bases_for(c)) <= allowed, floor_cap, most)
        method = cls(tables, collisions=bases_for(cap), **options)  # type: ignore[arg-type]
        log.info("qr_path: bases %s reach ratio %.2f (asked %s)", method.bases, method.compression_ratio(), budget)
        return method

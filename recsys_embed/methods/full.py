"""``full``: the uncompressed reference, one row per id in every table.

Idea: a plain TorchRec ``EmbeddingBagCollection`` (sum pooling). The training layer turns it into fbgemm's
table-batched embedding kernels with a fused sparse optimizer (see :mod:`recsys_embed.methods.fused`), or shards
it with TorchRec's planner; its output equals TorchRec's EBC with the same weights.

Memory: ``sum(num_embeddings * embedding_dim * 4)`` bytes, i.e. ratio 1.

Example::

    from torchrec import EmbeddingBagConfig
    from recsys_embed.methods import build_embedding

    tables = [EmbeddingBagConfig(name="t_user", num_embeddings=1000, embedding_dim=16, feature_names=["user"])]
    emb = build_embedding("full", tables)
    emb.memory_bytes()  # 1000 * 16 * 4
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from recsys_embed.methods.base import Budget, EmbeddingMethod, full_bytes
from recsys_embed.methods.registry import register


@register("full")
class Full(EmbeddingMethod):
    """One row per id: a plain TorchRec ``EmbeddingBagCollection`` behind the method interface."""

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        *,
        validate_ids: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(tables, validate_ids=validate_ids)
        self.tables = self.add_tables("tables", self._tables, device=torch.device(device or "cpu"))

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.tables(features)

    def memory_bytes(self) -> int:
        return full_bytes(self._tables)

    @classmethod
    def from_budget(cls, tables: Sequence[EmbeddingBagConfig], budget: Budget, **options: object) -> Full:
        need, allowed = full_bytes(tables), budget.max_bytes(tables)
        if need > allowed:
            raise ValueError(
                f"Method 'full' stores {need} bytes but the budget allows {allowed}: the smallest reachable budget "
                "is ratio=1. Pick a compression method (e.g. 'hash') for ratios above 1."
            )
        return cls(tables, **options)  # type: ignore[arg-type]

"""``GraphDataModule``: a graph-layout folder (:mod:`recsys_embed.data.graph`) -> BPR batches and ranking chunks.

Training batches are :class:`BPRBatch` (user, positive item, negative item), every train pair once per epoch in
an order seeded by ``seed + epoch``. Evaluation batches are :class:`RankingBatch`: a chunk of users that have
items in the evaluated split, with their train items (to exclude from the ranking) and their held-out items (the
targets), as ``(row in chunk, item)`` pairs, so full-ranking metrics need ``chunk x num_items`` scores at a time.
Validation reads ``val.parquet`` if the folder has one, else the test split (as NGCF and LightGCN report).

Example::

    data = GraphDataModule("data/ml100k_graph", batch_size=2048)
    data.setup("fit")
    adjacency = data.adjacency  # D^-1/2 A D^-1/2 of the train graph, built once
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from recsys_embed.data.graph import InteractionGraph, read_graph_meta


@dataclass
class BPRBatch:
    """``users``, ``positives``, ``negatives``: int64 tensors of one length."""

    users: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class RankingBatch:
    """A chunk of ``users``; ``exclude``/``targets``: ``(2, n)`` pairs of (row in the chunk, item id)."""

    users: torch.Tensor
    exclude: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.users)


def _chunk_pairs(indptr: torch.Tensor, items: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """``(2, n)`` (row in ``users``, item) pairs of the CSR ``(indptr, items)`` for the given users, vectorized."""
    starts, ends = indptr[users], indptr[users + 1]
    counts = ends - starts
    rows = torch.repeat_interleave(torch.arange(len(users)), counts)
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.stack([rows, items[torch.repeat_interleave(starts, counts) + offsets]])


class BPRTriples(IterableDataset):
    """One epoch of seeded BPR triples in batches (``set_epoch`` changes the order and the negatives)."""

    def __init__(self, graph: InteractionGraph, batch_size: int, seed: int) -> None:
        self.graph, self.batch_size, self.seed, self.epoch = graph, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.graph.pairs["train"][0]) // self.batch_size)

    def __iter__(self) -> Iterator[BPRBatch]:
        users, positives, negatives = self.graph.bpr_triples(self.seed + self.epoch)
        for u, p, n in zip(*(t.split(self.batch_size) for t in (users, positives, negatives))):
            yield BPRBatch(u, p, n)


class RankingChunks(IterableDataset):
    """The users with items in ``split``, in chunks of ``chunk_size``, with their held-out items and the items
    ranking leaves out (``exclude``: the train split's, and the validation split's when testing)."""

    def __init__(
        self, graph: InteractionGraph, split: str, chunk_size: int, exclude: tuple[str, ...] = ("train",)
    ) -> None:
        self.train = graph.positives(*exclude)
        self.held_out = graph.positives(split)
        indptr = self.held_out[0]
        self.users = torch.nonzero(indptr[1:] > indptr[:-1]).flatten()
        self.chunk_size = chunk_size

    def __len__(self) -> int:
        return -(-len(self.users) // self.chunk_size)

    def __iter__(self) -> Iterator[RankingBatch]:
        for users in self.users.split(self.chunk_size):
            yield RankingBatch(users, _chunk_pairs(*self.train, users), _chunk_pairs(*self.held_out, users))


class GraphDataModule(pl.LightningDataModule):
    """BPR training batches and full-ranking evaluation chunks of a graph-layout folder.

    Args:
        data_dir: the folder (``graph.json`` + ``train.parquet``/``test.parquet``, optional ``val.parquet``).
        batch_size: BPR triples per training step (the papers: 2048).
        eval_users: users scored against every item per evaluation step (memory ``eval_users * num_items``).
        seed: seed of the BPR order and negatives (epoch ``e`` uses ``seed + e``).
    """

    def __init__(self, data_dir: str, batch_size: int = 2048, eval_users: int = 1024, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_users", eval_users)):
            if value < 1:
                raise ValueError(f"GraphDataModule {name} must be at least 1 (got {value}).")
        self.data_dir, self.batch_size, self.eval_users, self.seed = Path(data_dir), batch_size, eval_users, seed
        self.meta = read_graph_meta(data_dir)
        self._graph: InteractionGraph | None = None
        self._adjacency: torch.Tensor | None = None
        self._train: BPRTriples | None = None

    @property
    def num_users(self) -> int:
        return int(self.meta["num_users"])

    @property
    def num_items(self) -> int:
        return int(self.meta["num_items"])

    @property
    def graph(self) -> InteractionGraph:
        if self._graph is None:
            self._graph = InteractionGraph.load(self.data_dir)
        return self._graph

    @property
    def adjacency(self) -> torch.Tensor:
        """``D^-1/2 A D^-1/2`` of the train graph (built once)."""
        if self._adjacency is None:
            self._adjacency = self.graph.normalized_adjacency()
        return self._adjacency

    @property
    def id_counts(self) -> dict[str, object]:
        """Train degrees per feature (``user``, ``item``): the id counts of frequency-aware methods."""
        users, items = self.graph.pairs["train"]
        user_counts = np.bincount(users, minlength=self.num_users)
        return {"user": user_counts, "item": np.bincount(items, minlength=self.num_items)}

    def setup(self, stage: str | None = None) -> None:
        self.graph  # noqa: B018 - read once, here

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self._train = BPRTriples(self.graph, self.batch_size, self.seed)
        return DataLoader(self._train, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        split = "val" if "val" in self.graph.pairs else "test"
        return DataLoader(RankingChunks(self.graph, split, self.eval_users), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        seen = ("train", "val") if "val" in self.graph.pairs else ("train",)  # a user's known items are not ranked
        return DataLoader(RankingChunks(self.graph, "test", self.eval_users, exclude=seen), batch_size=None)

"""Interaction graphs for graph collaborative filtering: the project's graph layout, the normalised adjacency and
seeded BPR triples.

The graph layout is a folder (``recsys-embed data graph`` writes one from MovieLens, LastFM or the NGCF/LightGCN
``train.txt``/``test.txt`` releases)::

    graph.json       {"layout": "graph", "version": 1, "num_users": U, "num_items": I,
                      "splits": {"train": "train.parquet", "test": "test.parquet"}, "rows": {...}, "source": {...}}
    train.parquet    columns user, item (int64): one positive interaction per row, no duplicates
    test.parquet     the same columns; optional val.parquet

User ids are ``[0, U)``, item ids ``[0, I)``, each numbered on its own. The bipartite adjacency of the train pairs
over ``U + I`` nodes (users first, then items), symmetrically normalised as in NGCF and LightGCN, is
``A_hat = D^-1/2 A D^-1/2`` (``D`` the node degrees; isolated nodes get zero rows), built once as a torch sparse
matrix. BPR triples (user, positive item, negative item) take every train pair once per epoch in a seeded order,
with a negative drawn uniformly from the items that user never interacted with in train (rejection sampling,
vectorized over the whole epoch).

Example::

    graph = InteractionGraph.load("data/ml100k_graph")
    adjacency = graph.normalized_adjacency()  # (U + I, U + I) sparse
    users, positives, negatives = graph.bpr_triples(seed=0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

GRAPH_FILE = "graph.json"
GRAPH_LAYOUT = "graph"
GRAPH_VERSION = 1
COLUMNS = ("user", "item")


@dataclass
class InteractionGraph:
    """Users, items and their positive interactions per split (``pairs[split] = (users, items)`` int64 arrays)."""

    num_users: int
    num_items: int
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "train" not in self.pairs:
            raise ValueError(f"An interaction graph needs a 'train' split; it has {sorted(self.pairs)}.")
        for split, (users, items) in self.pairs.items():
            users = np.asarray(users, dtype=np.int64)
            items = np.asarray(items, dtype=np.int64)
            if users.shape != items.shape or users.ndim != 1:
                raise ValueError(f"Split {split!r}: users and items must be 1-d arrays of one length.")
            for name, ids, bound in (("user", users, self.num_users), ("item", items, self.num_items)):
                if len(ids) and (ids.min() < 0 or ids.max() >= bound):
                    raise ValueError(
                        f"Split {split!r}: {name} ids span [{ids.min()}, {ids.max()}], outside [0, {bound}); "
                        f"num_{name}s must cover every id."
                    )
            self.pairs[split] = (users, items)

    # ---- layout -----------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write the graph layout: one parquet file per split, then ``graph.json`` (last: it marks a whole folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for split, (users, items) in self.pairs.items():
            pq.write_table(pa.table({"user": users, "item": items}), folder / f"{split}.parquet")
        meta = {
            "layout": GRAPH_LAYOUT,
            "version": GRAPH_VERSION,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "splits": {split: f"{split}.parquet" for split in self.pairs},
            "rows": {split: len(users) for split, (users, _) in self.pairs.items()},
            "source": self.source,
        }
        (folder / GRAPH_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> InteractionGraph:
        """Read a graph-layout folder (see the module docstring)."""
        meta = read_graph_meta(folder)
        pairs = {}
        for split, name in meta["splits"].items():
            table = pq.read_table(Path(folder) / name, columns=list(COLUMNS))
            pairs[split] = (table["user"].to_numpy().astype(np.int64), table["item"].to_numpy().astype(np.int64))
        return cls(meta["num_users"], meta["num_items"], pairs, source=meta.get("source", {}))

    # ---- structure --------------------------------------------------------------------------------------------
    def normalized_adjacency(self) -> torch.Tensor:
        """``D^-1/2 A D^-1/2`` of the train bipartite graph, ``(U + I, U + I)`` sparse COO (users, then items)."""
        users, items = (torch.from_numpy(a) for a in self.pairs["train"])
        return normalized_bipartite_adjacency(users, items, self.num_users, self.num_items)

    def positives(self, *splits: str) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR of the items per user of ``splits`` together: ``(indptr (U + 1,), items)``, sorted within each user."""
        for split in splits:
            if split not in self.pairs:
                raise ValueError(f"The graph has no split {split!r}; it has {sorted(self.pairs)}.")
        users = np.concatenate([self.pairs[split][0] for split in splits])
        items = np.concatenate([self.pairs[split][1] for split in splits])
        order = np.lexsort((items, users))
        indptr = np.zeros(self.num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=self.num_users), out=indptr[1:])
        return torch.from_numpy(indptr), torch.from_numpy(items[order])

    def bpr_triples(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One epoch of BPR triples: every train pair once, in a seeded order, each with a uniform negative item
        the user has no train interaction with."""
        users, items = self.pairs["train"]
        degree = np.bincount(users, minlength=self.num_users)
        if degree.max(initial=0) >= self.num_items:
            full = int(np.argmax(degree))
            raise ValueError(
                f"User {full} interacted with every one of the {self.num_items} items: BPR has no negative to "
                "sample for it; drop such users from the data."
            )
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(users))
        users, positives = users[order], items[order]
        negatives = sample_negatives(users, positive_keys(*self.pairs["train"], self.num_items), self.num_items, rng)
        return torch.from_numpy(users), torch.from_numpy(positives), torch.from_numpy(negatives)


def read_graph_meta(folder: str | Path) -> dict[str, Any]:
    """``graph.json`` of a graph-layout folder, checked."""
    path = Path(folder) / GRAPH_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a graph dataset folder (no {GRAPH_FILE}); write one with recsys-embed data graph "
            "--input ... --output FOLDER."
        )
    meta = json.loads(path.read_text())
    if meta.get("layout") != GRAPH_LAYOUT or meta.get("version") != GRAPH_VERSION:
        raise ValueError(
            f"{path} has layout {meta.get('layout')!r} version {meta.get('version')!r}; this package reads layout "
            f"{GRAPH_LAYOUT!r} version {GRAPH_VERSION}: rewrite the folder with recsys-embed data graph."
        )
    return meta


def normalized_bipartite_adjacency(
    users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int
) -> torch.Tensor:
    """``D^-1/2 A D^-1/2`` for the symmetric bipartite ``A`` with ``A[u, U + i] = A[U + i, u] = 1`` per pair."""
    nodes = num_users + num_items
    rows = torch.cat([users, items + num_users])
    cols = torch.cat([items + num_users, users])
    degree = torch.bincount(rows, minlength=nodes).to(torch.float32)
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1).rsqrt(), torch.zeros_like(degree))
    values = inv_sqrt[rows] * inv_sqrt[cols]
    indices = torch.stack([rows, cols])
    return torch.sparse_coo_tensor(indices, values, (nodes, nodes), check_invariants=True).coalesce()


def positive_keys(users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """Sorted unique ``user * num_items + item`` keys of the pairs (membership by binary search)."""
    return np.unique(users.astype(np.int64) * num_items + items)


def sample_negatives(
    users: np.ndarray, keys: np.ndarray, num_items: int, rng: np.random.Generator, max_rounds: int = 1000
) -> np.ndarray:
    """A uniform item per user with ``user * num_items + item`` not in the sorted ``keys``: draw all, redraw the
    hits, until none is left (each round is vectorized; a round redraws only the colliding entries)."""
    negatives = rng.integers(0, num_items, size=len(users), dtype=np.int64)
    pending = np.arange(len(users))
    for _ in range(max_rounds):
        query = users[pending] * num_items + negatives[pending]
        found = np.searchsorted(keys, query)
        hit = (found < len(keys)) & (keys[np.minimum(found, len(keys) - 1)] == query)
        pending = pending[hit]
        if not len(pending):
            return negatives
        negatives[pending] = rng.integers(0, num_items, size=len(pending), dtype=np.int64)
    raise ValueError(
        f"Negative sampling found no non-positive item for {len(pending)} triples in {max_rounds} rounds: some "
        "users interacted with nearly every item; drop them from the data."
    )

"""Graph CF data: the graph layout, the normalised adjacency, BPR sampling, ranking chunks and the data script."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_scripts.cli import main as data_main
from data_scripts.graph import detect_format, per_user_split, prepare_graph
from recsys_embed.data import GraphDataModule, InteractionGraph
from recsys_embed.data.graph_datamodule import RankingChunks
from tests.conftest import SHARED_DATA

# 3 users, 4 items; user 2 has no train items (isolated), item 3 only appears in test
TRAIN = (np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 2]))
TEST = (np.array([0, 1, 2]), np.array([2, 3, 0]))


def tiny_graph() -> InteractionGraph:
    return InteractionGraph(3, 4, {"train": TRAIN, "test": TEST})


def test_adjacency_is_the_symmetric_normalised_bipartite_matrix() -> None:
    adjacency = tiny_graph().normalized_adjacency().to_dense()
    a = torch.zeros(7, 7)
    for u, i in zip(*TRAIN):
        a[u, 3 + i] = a[3 + i, u] = 1.0
    degree = a.sum(1)
    expected = torch.zeros(7, 7)
    for r in range(7):
        for c in range(7):
            if a[r, c]:
                expected[r, c] = 1.0 / (degree[r] * degree[c]).sqrt()
    torch.testing.assert_close(adjacency, expected)
    torch.testing.assert_close(adjacency, adjacency.T)
    assert adjacency[2].abs().sum() == 0 and adjacency[3 + 3].abs().sum() == 0  # isolated nodes: zero rows
    assert adjacency[0, 3] == pytest.approx(1 / np.sqrt(2 * 2))  # user 0 (2 items) -- item 0 (2 users)


def test_bpr_negatives_are_never_positives_and_each_pair_comes_once() -> None:
    rng = np.random.default_rng(0)
    users = rng.integers(0, 50, 1500)
    items = rng.integers(0, 30, 1500)  # dense: about 63% of each user's items are positives
    keys = np.unique(users * 30 + items)
    graph = InteractionGraph(50, 30, {"train": (keys // 30, keys % 30)})
    u, p, n = graph.bpr_triples(seed=1)
    positives = set(keys.tolist())
    assert not any(int(a) * 30 + int(b) in positives for a, b in zip(u, n))
    assert sorted((u * 30 + p).tolist()) == sorted(keys.tolist())  # every train pair once
    again = graph.bpr_triples(seed=1)
    other = graph.bpr_triples(seed=2)
    assert all(torch.equal(a, b) for a, b in zip((u, p, n), again))
    assert not torch.equal(n, other[2])


def test_bpr_refuses_a_user_with_every_item() -> None:
    graph = InteractionGraph(2, 3, {"train": (np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0]))})
    with pytest.raises(ValueError, match="User 0 interacted with every one of the 3 items"):
        graph.bpr_triples(seed=0)


def test_ids_outside_the_sizes_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"item ids span \[4, 4\], outside \[0, 4\)"):
        InteractionGraph(3, 4, {"train": (np.array([0]), np.array([4]))})


def test_layout_round_trip_and_ranking_chunks(tmp_path: Path) -> None:
    tiny_graph().save(tmp_path / "g")
    loaded = InteractionGraph.load(tmp_path / "g")
    assert (loaded.num_users, loaded.num_items) == (3, 4)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.pairs["test"], TEST))
    chunks = list(RankingChunks(loaded, "test", chunk_size=2))
    assert [c.users.tolist() for c in chunks] == [[0, 1], [2]]
    first = chunks[0]
    assert first.exclude.T.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]  # (row in chunk, train item)
    assert first.targets.T.tolist() == [[0, 2], [1, 3]]
    assert chunks[1].exclude.shape == (2, 0) and chunks[1].targets.T.tolist() == [[0, 0]]
    data = GraphDataModule(str(tmp_path / "g"), batch_size=2)
    batches = list(data.train_dataloader())
    assert [len(b) for b in batches] == [2, 2, 1]
    assert data.id_counts["item"].tolist() == [2, 2, 1, 0]


def test_not_a_graph_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a graph dataset folder .* recsys-embed data graph"):
        GraphDataModule(str(tmp_path))


def test_lightgcn_format(tmp_path: Path) -> None:
    source = tmp_path / "gowalla"
    source.mkdir()
    (source / "train.txt").write_text("0 1 2\n1 0 2 2\n2\n")
    (source / "test.txt").write_text("0 3 1\n2 0\n")
    assert detect_format(source) == "lightgcn"
    graph = prepare_graph(tmp_path / "out", input=source)
    assert (graph.num_users, graph.num_items) == (3, 4)
    assert list(zip(*graph.pairs["train"])) == [(0, 1), (0, 2), (1, 0), (1, 2)]  # duplicate (1, 2) once
    assert list(zip(*graph.pairs["test"])) == [(0, 3), (2, 0)]  # (0, 1) is a train pair: dropped from test
    assert InteractionGraph.load(tmp_path / "out").num_items == 4


def test_lastfm_format_and_malformed_lines(tmp_path: Path) -> None:
    source = tmp_path / "lastfm"
    source.mkdir()
    (source / "data1.txt").write_text("1\t5\t100\n2\t1\t3\n")
    (source / "test1.txt").write_text("2\t5\t7\n")
    graph = prepare_graph(tmp_path / "out", input=source)
    assert (graph.num_users, graph.num_items) == (2, 5)  # ids from 1 become ids from 0
    assert list(zip(*graph.pairs["train"])) == [(0, 4), (1, 0)]
    (source / "test1.txt").write_text("2\t5\t7\n2\tx\t1\n")
    with pytest.raises(ValueError, match=r"test1.txt, line 2: item is 'x', expected a positive integer"):
        prepare_graph(tmp_path / "out2", input=source)


def test_movielens_threshold_and_seeded_per_user_split(tmp_path: Path) -> None:
    source = tmp_path / "ml"
    source.mkdir()
    lines = [f"1\t{i}\t{5 if i <= 10 else 2}\t0" for i in range(1, 13)] + ["2\t3\t4\t0", "3\t12\t1\t0"]
    (source / "u.data").write_text("\n".join(lines) + "\n")
    graph = prepare_graph(tmp_path / "out", input=source, seed=3)
    assert (graph.num_users, graph.num_items) == (3, 12)  # user 3 and items 11, 12 have no positives
    train, test = graph.pairs["train"], graph.pairs["test"]
    assert len(test[0]) == 2 and set(test[0].tolist()) == {0}  # floor(10 * 0.2) of user 1, none of user 2's one
    assert sorted([*train[1].tolist(), *test[1].tolist()]) == sorted([*range(10), 2])
    again = prepare_graph(tmp_path / "again", input=source, seed=3)
    assert np.array_equal(again.pairs["test"][1], test[1])


def test_per_user_split_counts() -> None:
    users = np.repeat(np.arange(4), [1, 5, 10, 3])
    (train_users, _), (test_users, _) = per_user_split(users, np.arange(len(users)), 0.2, seed=0)
    assert np.bincount(test_users, minlength=4).tolist() == [0, 1, 2, 0]
    assert np.bincount(train_users, minlength=4).tolist() == [1, 4, 8, 3]


def test_data_command_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds none of the known files .* pass --format"):
        data_main(["graph", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
    (tmp_path / "empty" / "train.txt").write_text("0 a\n")
    (tmp_path / "empty" / "test.txt").write_text("0 1\n")
    with pytest.raises(SystemExit, match=r"train.txt, line 1: expected 'user item item ...'"):
        data_main(["graph", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("folder", "users", "items", "train_rows"),
    [("ml-100k", 943, 1682, None), ("lastfm", 1892, 4489, 42135)],
)
def test_real_samples(tmp_path: Path, folder: str, users: int, items: int, train_rows: int | None) -> None:
    source = SHARED_DATA / folder
    if not source.is_dir():
        pytest.skip(f"{source} is absent (licensed data, not shipped)")
    graph = prepare_graph(tmp_path / "out", input=source)
    assert (graph.num_users, graph.num_items) == (users, items)
    if train_rows is not None:
        assert len(graph.pairs["train"][0]) == train_rows
    else:  # 55,375 ratings >= 4 in ML-100K, about 80% of them in train
        total = len(graph.pairs["train"][0]) + len(graph.pairs["test"][0])
        assert total == 55375 and 0.78 < len(graph.pairs["train"][0]) / total < 0.82


def test_testing_with_a_validation_split_leaves_out_its_items_too(tmp_path: Path) -> None:
    """A user's validation items are known at test time: ranked, they would take top-K slots as misses."""
    pairs = {
        "train": (np.array([0, 1]), np.array([0, 3])),
        "val": (np.array([0]), np.array([1])),
        "test": (np.array([0, 1]), np.array([2, 4])),
    }
    InteractionGraph(2, 5, pairs, source="hand-made").save(tmp_path)
    data = GraphDataModule(str(tmp_path), eval_users=8)
    data.setup()
    (test,) = list(data.test_dataloader())
    (val,) = list(data.val_dataloader())
    excluded = {(int(r), int(i)) for r, i in test.exclude.T}
    assert excluded == {(0, 0), (0, 1), (1, 3)}  # user 0's train and validation items
    assert {(int(r), int(i)) for r, i in val.exclude.T} == {(0, 0)}  # validating: the train items only
    assert {(int(r), int(i)) for r, i in test.targets.T} == {(0, 2), (1, 4)}

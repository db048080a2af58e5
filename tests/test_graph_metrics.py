"""Full-ranking Recall@K / NDCG@K against values computed by hand, training items excluded."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_embed.training.ranking import ranking_metrics

SCORES = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
EXCLUDE = torch.tensor([[0, 1, 1], [0, 5, 4]])  # user 0's train item 0; user 1's train items 5 and 4
TARGETS = torch.tensor([[0, 0, 1], [1, 4, 1]])  # user 0 holds out items 1 and 4, user 1 item 1


def test_recall_and_ndcg_by_hand() -> None:
    got = ranking_metrics(SCORES, EXCLUDE, TARGETS, ks=[2, 3, 5])
    # user 0 ranks 1, 2, 3, 4, 5 (item 0 excluded): a hit at rank 0, another at rank 3
    # user 1 ranks 3, 2, 1, 0 (items 5, 4 excluded): a hit at rank 2
    ideal_two = 1 + 1 / math.log2(3)
    expected = {
        "recall@2": [0.5, 0.0],
        "ndcg@2": [1 / ideal_two, 0.0],
        "recall@3": [0.5, 1.0],
        "ndcg@3": [1 / ideal_two, 1 / math.log2(4)],
        "recall@5": [1.0, 1.0],
        "ndcg@5": [(1 + 1 / math.log2(5)) / ideal_two, 1 / math.log2(4)],
    }
    assert set(got) == set(expected)
    for name, values in expected.items():
        torch.testing.assert_close(got[name], torch.tensor(values), msg=name)


def test_without_the_exclusion_the_train_items_would_count() -> None:
    nothing = torch.zeros(2, 0, dtype=torch.int64)
    got = ranking_metrics(SCORES, nothing, TARGETS, ks=[3])
    # user 0 ranks 0, 1, 2: one hit; user 1 ranks 5, 4, 3: none
    torch.testing.assert_close(got["recall@3"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(got["ndcg@3"], torch.tensor([(1 / math.log2(3)) / (1 + 1 / math.log2(3)), 0.0]))


def test_k_beyond_the_item_count_and_bad_inputs() -> None:
    got = ranking_metrics(SCORES, EXCLUDE, TARGETS, ks=[50])
    torch.testing.assert_close(got["recall@50"], torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="positive integers"):
        ranking_metrics(SCORES, EXCLUDE, TARGETS, ks=[0])
    with pytest.raises(ValueError, match="at least one held-out item"):
        ranking_metrics(SCORES, EXCLUDE, TARGETS[:, :2], ks=[3])

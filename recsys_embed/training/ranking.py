"""Full-ranking top-K metrics of graph collaborative filtering: Recall@K and NDCG@K, training items excluded.

For a user ``u`` with held-out items ``T_u`` (the targets) and the top ``K`` of all items by score, the user's
train items removed from the ranking (as NGCF and LightGCN evaluate)::

    Recall@K = |top_K ∩ T_u| / |T_u|
    NDCG@K   = sum_{r < K, top_K[r] in T_u} 1 / log2(r + 2)  /  sum_{r < min(|T_u|, K)} 1 / log2(r + 2)

Users are scored in chunks (``chunk x num_items`` scores at a time); the metrics are per-user values averaged
over every user with at least one target.

Example::

    per_user = ranking_metrics(scores, exclude=train_pairs, targets=test_pairs, ks=[20])
    per_user["recall@20"].mean()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ranking_metrics(
    scores: torch.Tensor, exclude: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Per-user ``recall@k`` and ``ndcg@k`` for each ``k`` in ``ks``.

    Args:
        scores: ``(B, I)`` scores of every item for a chunk of ``B`` users.
        exclude: ``(2, n)`` (row, item) pairs removed from the ranking (the users' train items).
        targets: ``(2, m)`` (row, item) pairs of the held-out items; every row needs at least one.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"Ranking cut-offs must be positive integers, got {list(ks)}.")
    rows, num_items = scores.shape
    relevant = torch.zeros(rows, num_items, dtype=torch.bool, device=scores.device)
    relevant[targets[0], targets[1]] = True
    num_relevant = relevant.sum(1)
    if rows and num_relevant.min() == 0:
        raise ValueError("Every ranked user needs at least one held-out item (rank only users with targets).")
    masked = scores.detach().clone()
    masked[exclude[0], exclude[1]] = float("-inf")
    cut = min(max(ks), num_items)
    top = masked.topk(cut, dim=1).indices
    hits = relevant.gather(1, top).to(torch.float32)
    discount = 1.0 / torch.log2(torch.arange(2, cut + 2, device=scores.device, dtype=torch.float32))
    ideal = torch.cumsum(discount, 0)
    out = {}
    for k in ks:
        k_cut = min(k, cut)
        out[f"recall@{k}"] = hits[:, :k_cut].sum(1) / num_relevant
        dcg = (hits[:, :k_cut] * discount[:k_cut]).sum(1)
        out[f"ndcg@{k}"] = dcg / ideal[num_relevant.clamp(max=k_cut) - 1]
    return out

"""Budget-solver helpers shared by the methods: a monotone integer search and a per-table allocation of bytes.

:func:`largest_fitting` finds the largest knob (rows) whose memory fits; :func:`allocate_bases` chooses one base
(collisions) per table so that the total fits, with the largest base as small as possible (``qr``, ``qr_path``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest integer ``x`` in ``[low, high]`` with ``fits(x)``, for a monotone ``fits`` with ``fits(low)``."""
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def ceil_root(n: int, k: int) -> int:
    """The smallest integer ``r >= 1`` with ``r**k >= n`` (exact integer arithmetic, no float rounding)."""
    r = max(1, round(n ** (1.0 / k)))
    while r**k < n:
        r += 1
    while r > 1 and (r - 1) ** k >= n:
        r -= 1
    return r


@dataclass(frozen=True)
class BaseChoices:
    """One table's useful bases (collisions): increasing ``bases``, each with strictly fewer ``costs`` (bytes)
    than every smaller base. Any other base is dominated: more collisions and no fewer bytes than one of these."""

    bases: np.ndarray  # int64, increasing, starts at 1
    costs: np.ndarray  # int64, strictly decreasing

    @classmethod
    def from_costs(cls, costs: Sequence[int] | np.ndarray) -> BaseChoices:
        """The frontier of ``costs[i]`` = bytes at base ``i + 1`` (ties go to the smaller base)."""
        costs = np.asarray(costs, dtype=np.int64)
        keep = np.ones(len(costs), dtype=bool)
        keep[1:] = costs[1:] < np.minimum.accumulate(costs)[:-1]
        return cls(bases=np.flatnonzero(keep).astype(np.int64) + 1, costs=costs[keep])

    def at_most(self, cap: int) -> int:
        """Index of the best (fewest-bytes, then fewest-collisions) choice whose base is ``<= cap``."""
        return int(np.searchsorted(self.bases, cap, side="right")) - 1


def allocate_bases(choices: Sequence[BaseChoices], allowed: int) -> list[int] | None:
    """Per-table bases whose total bytes fit ``allowed``, or None when even every table's fewest bytes do not.

    The rule: the largest base over all tables is as small as possible (exact, by bisection on a common cap
    ``B``: each table takes its best base ``<= B``, and total bytes fall as ``B`` grows); then the bytes left
    under the budget go, greedily, to lowering the tables with the most collisions first (a table whose next
    lower base does not fit the remainder is skipped), so small tables do not keep collisions they can afford
    to drop. ``O(T log B)`` for the bisection plus one heap step per lowered base.
    """
    if sum(int(c.costs[-1]) for c in choices) > allowed:
        return None

    def total(cap: int) -> int:
        return sum(int(c.costs[c.at_most(cap)]) for c in choices)

    low, high = 1, max(int(c.bases[-1]) for c in choices)
    while low < high:  # the smallest cap that fits; total(high) fits
        mid = (low + high) // 2
        low, high = (low, mid) if total(mid) <= allowed else (mid + 1, high)
    index = [c.at_most(low) for c in choices]
    left = allowed - total(low)
    heap = [(-int(c.bases[j]), t) for t, (c, j) in enumerate(zip(choices, index)) if j > 0]
    heapq.heapify(heap)
    while heap:
        _, t = heapq.heappop(heap)
        c, j = choices[t], index[t]
        step = int(c.costs[j - 1] - c.costs[j])
        if step > left:
            continue  # the remainder only shrinks: this table stays where it is
        index[t], left = j - 1, left - step
        if j - 1 > 0:
            heapq.heappush(heap, (-int(c.bases[j - 1]), t))
    return [int(c.bases[j]) for c, j in zip(choices, index)]

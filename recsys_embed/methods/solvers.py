"""Budget-solver helpers shared by the methods: a monotone integer search and a per-table allocation of bytes.

:func:`largest_fitting` finds the largest knob (rows) whose memory fits; :func:`allocate_bases` chooses one base
(collisions) per table under one byte cap for every table (``qr``, ``qr_path``).
"""

from __future__ import annotations

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

    The rule, a uniform byte cap (the paper's one-collision-count setting, generalised): every table takes the
    fewest collisions whose bytes stay under a common cap ``C`` (a table that fits under it whole stays full), or
    its fewest bytes when no base does; ``C`` is the largest cap whose total fits (bisection: the total grows with
    ``C``). Bytes thus go where they buy the most: small, frequent tables stay uncompressed and the large tables,
    which hold almost all the bytes, share the compression; any budget down to the sum of every table's fewest
    bytes is met. ``O(T log C)``.
    """
    if sum(int(c.costs[-1]) for c in choices) > allowed:
        return None

    def picks(cap: int) -> list[int]:
        """Per table: the index of its fewest-collision choice with ``costs <= cap`` (its last choice if none)."""
        return [min(int(np.searchsorted(-c.costs, -cap, side="left")), len(c.costs) - 1) for c in choices]

    def total(cap: int) -> int:
        return sum(int(c.costs[j]) for c, j in zip(choices, picks(cap)))

    low, high = 0, max(int(c.costs[0]) for c in choices)  # total(low) fits; the largest cap that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if total(mid) <= allowed else (low, mid - 1)
    return [int(c.bases[j]) for c, j in zip(choices, picks(low))]

"""Evolutionary search over one choice per field (e.g. each field's embedding dim), fitness given by the caller.

The one-shot NAS search OptEmbed uses (Lyu et al., CIKM'22, arXiv 2208.04482, after Guo et al.'s single-path
one-shot search): start from random candidates; each iteration keeps the ``keep`` fittest seen so far as parents,
adds ``mutations`` children (each field of a random parent redrawn with probability ``mutation_prob``) and
``crossovers`` children (a one-point crossover of two random parents), and scores the new ones. The paper's
settings are the defaults: 10 mutations, 10 crossovers, 30 iterations, probability 0.1, top 15 kept. Fitness is
evaluated once per distinct candidate (cached), and the search is deterministic for a ``seed``.

Example::

    best = evolutionary_search(lambda dims: -sum(abs(d - 8) for d in dims), choices=[[4, 8, 12, 16]] * 3)
    best.candidate, best.fitness, best.initial_fitness
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Candidate = tuple[int, ...]


@dataclass
class SearchResult:
    """The fittest candidate, its fitness, the best fitness of the initial population, and the best per iteration."""

    candidate: Candidate
    fitness: float
    initial_fitness: float
    history: list[float] = field(default_factory=list)
    evaluations: int = 0


def evolutionary_search(
    fitness: Callable[[Candidate], float],
    choices: Sequence[Sequence[int]],
    *,
    mutations: int = 10,
    crossovers: int = 10,
    iterations: int = 30,
    mutation_prob: float = 0.1,
    keep: int = 15,
    seed: int = 0,
) -> SearchResult:
    """Search one value per field, field ``f``'s among ``choices[f]``, maximising ``fitness`` (see the module
    docstring)."""
    fields = len(choices)
    if not fields or not all(choices) or mutations < 0 or crossovers < 0 or iterations < 0 or keep < 1:
        raise ValueError(
            f"Evolutionary search needs at least one field, choices for each, keep >= 1 and counts >= 0 (got "
            f"{[len(c) for c in choices]} choices, keep {keep}, {mutations} mutations, {crossovers} crossovers, "
            f"{iterations} iterations)."
        )
    if not 0.0 <= mutation_prob <= 1.0:
        raise ValueError(f"Evolutionary search: mutation_prob must be in [0, 1] (got {mutation_prob}).")
    rng = random.Random(seed)
    scores: dict[Candidate, float] = {}

    def score(candidates: list[Candidate]) -> None:
        for cand in candidates:
            if cand not in scores:
                scores[cand] = float(fitness(cand))

    initial = [tuple(rng.choice(c) for c in choices) for _ in range(max(1, mutations + crossovers))]
    score(initial)
    initial_best = max(scores[c] for c in initial)
    history = [initial_best]
    for iteration in range(iterations):
        parents = sorted(scores, key=lambda c: -scores[c])[:keep]
        children = []
        for _ in range(mutations):
            parent = rng.choice(parents)
            children.append(
                tuple(rng.choice(c) if rng.random() < mutation_prob else v for c, v in zip(choices, parent))
            )
        for _ in range(crossovers):
            a, b = rng.choice(parents), rng.choice(parents)
            point = rng.randint(1, fields - 1) if fields > 1 else 1  # a cut inside: both parents contribute
            children.append(a[:point] + b[point:])
        score(children)
        history.append(max(scores.values()))
        log.info("Evolutionary search iteration %d/%d: best fitness %.6f", iteration + 1, iterations, history[-1])
    best = max(scores, key=lambda c: scores[c])
    return SearchResult(best, scores[best], initial_best, history, len(scores))

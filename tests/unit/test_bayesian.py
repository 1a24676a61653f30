"""strategy bayesian: Optuna's TPE over per-task coefficients, seeded, within a budget."""

from __future__ import annotations

import pytest

from storage.errors import SpecError
from workers.search.strategies import STRATEGIES, Point, bayesian, best_point

TARGET = (0.3, 0.7, 0.5)


class Bowl:
    """A concave objective with its optimum at TARGET; records every batch it is asked for."""

    def __init__(self) -> None:
        self.batches: list[list[Point]] = []

    def __call__(self, points: list[Point]) -> list[float]:
        self.batches.append(points)
        return [
            -sum((p - t) ** 2 for p, t in zip(point, TARGET[: len(point)], strict=True))
            for point in points
        ]


def test_bayesian_finds_the_planted_optimum_region_within_its_budget() -> None:
    bowl = Bowl()
    scores = bayesian(bowl, 3, [0.0, 0.5, 1.0], budget=60, seed=0, batch=4)
    assert len(scores) == 60 == sum(len(batch) for batch in bowl.batches)
    assert max(len(batch) for batch in bowl.batches) <= 4
    assert all(0.0 <= v <= 1.0 for point in scores for v in point)
    best = best_point(scores)
    assert all(abs(b - t) < 0.1 for b, t in zip(best, TARGET, strict=True)), best
    startup = [p for batch in bowl.batches[:3] for p in batch]  # the sampler's random start
    assert scores[best] > max(scores[p] for p in startup)


def test_bayesian_is_reproducible_with_its_seed_and_registered() -> None:
    first = bayesian(Bowl(), 2, [0.0, 1.0], budget=12, seed=3, batch=2)
    assert bayesian(Bowl(), 2, [0.0, 1.0], budget=12, seed=3, batch=2) == first
    assert bayesian(Bowl(), 2, [0.0, 1.0], budget=12, seed=4, batch=2) != first
    assert STRATEGIES["bayesian"] is bayesian


def test_bayesian_proposes_within_the_grid_bounds_and_needs_a_budget() -> None:
    scores = bayesian(Bowl(), 2, [0.2, 0.3, 0.6], budget=10, seed=0)
    assert all(0.2 <= v <= 0.6 for point in scores for v in point)
    with pytest.raises(SpecError, match="budget"):
        bayesian(Bowl(), 2, [0.0, 1.0], budget=None)

"""Search strategies over per-task coefficient vectors (MERGING.md, "Coefficient search").

A strategy proposes batches of points α ∈ grid^T and asks ``evaluate`` for their objective
values; it never knows how they are scored (the exact fast path, or real forward passes fanned
out over Ray actors). Points are ranked as the candidates are: higher objective first, then the
smaller coefficient norm, then the point itself, so every choice is deterministic.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

from storage.errors import SpecError

Point = tuple[float, ...]
Evaluate = Callable[[list[Point]], list[float]]

MAX_PASSES = 20


class SearchStrategy(Protocol):
    """``seed`` seeds a stochastic strategy; ``batch``: points it may propose at once (so
    several scorer actors work together). The deterministic strategies ignore both."""

    def __call__(
        self,
        evaluate: Evaluate,
        dims: int,
        grid: Sequence[float],
        budget: int | None,
        *,
        seed: int = 0,
        batch: int = 1,
    ) -> dict[Point, float]: ...


def rank(point: Point, value: float) -> tuple[float, float, Point]:
    """Sort key: the best point sorts first."""
    return (-round(value, 12), math.sqrt(sum(v * v for v in point)), point)


def best_point(scores: dict[Point, float]) -> Point:
    return min(scores, key=lambda point: rank(point, scores[point]))


class _Memo:
    """Evaluates each distinct point once, keeps the best so far, stops at the budget."""

    def __init__(self, evaluate: Evaluate, budget: int | None) -> None:
        self.evaluate, self.budget = evaluate, budget
        self.scores: dict[Point, float] = {}
        self.best: tuple[tuple[float, float, Point], Point] | None = None

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and len(self.scores) >= self.budget

    def __call__(self, points: list[Point]) -> None:
        fresh = list(dict.fromkeys(p for p in points if p not in self.scores))
        if self.budget is not None:
            fresh = fresh[: max(0, self.budget - len(self.scores))]
        if fresh:
            for point, value in zip(fresh, self.evaluate(fresh), strict=True):
                self.scores[point] = value
                key = rank(point, value)
                if self.best is None or key < self.best[0]:
                    self.best = (key, point)


def coordinate_ascent(
    evaluate: Evaluate,
    dims: int,
    grid: Sequence[float],
    budget: int | None = None,
    *,
    seed: int = 0,
    batch: int = 1,
) -> dict[Point, float]:
    """Start at the best shared coefficient, then sweep one coordinate at a time over the grid.

    Each sweep moves the current point to the best value of one α_t with the others fixed;
    it stops when a full pass over the T coordinates no longer moves the point, after
    MAX_PASSES passes, or when ``budget`` distinct points have been evaluated. Returns every
    evaluated point with its objective value.
    """
    values = [float(v) for v in grid]
    memo = _Memo(evaluate, budget)
    memo([(value,) * dims for value in values])
    current = memo.best[1]
    for _ in range(MAX_PASSES):
        moved = False
        for axis in range(dims):
            if memo.exhausted:
                return memo.scores
            memo([current[:axis] + (value,) + current[axis + 1 :] for value in values])
            best = memo.best[1]
            if best != current:
                current, moved = best, True
        if not moved:
            break
    return memo.scores


def full_grid(
    evaluate: Evaluate,
    dims: int,
    grid: Sequence[float],
    budget: int | None = None,
    *,
    seed: int = 0,
    batch: int = 1,
) -> dict[Point, float]:
    """Every point of grid^T (refused when that is more than ``budget`` points)."""
    count = len(grid) ** dims
    limit = budget if budget is not None else 100_000
    if count > limit:
        raise SpecError(
            f"merge.search: a per-task grid over {dims} tasks has {len(grid)}^{dims} = {count} "
            f"points, more than the budget {limit}: use strategy coordinate_ascent, a coarser "
            "coefficient grid, or a larger merge.search.budget"
        )
    memo = _Memo(evaluate, None)
    points = [tuple(float(v) for v in p) for p in itertools.product(grid, repeat=dims)]
    for start in range(0, len(points), 4096):
        memo(points[start : start + 4096])
    return memo.scores


def bayesian(
    evaluate: Evaluate,
    dims: int,
    grid: Sequence[float],
    budget: int | None = None,
    *,
    seed: int = 0,
    batch: int = 1,
) -> dict[Point, float]:
    """Per-task coefficients proposed by Optuna's TPE sampler (Bergstra et al., NeurIPS 2011),
    each α_t within [min(grid), max(grid)], until ``budget`` distinct points are scored.

    Trials are asked for ``batch`` at a time and told their values together (ask/tell, with the
    constant-liar heuristic for the pending ones), so ``evaluate`` can fan a batch out over the
    scorer actors. Proposals are rounded to 6 decimals; a repeated point is told its known value
    and costs no budget. The sampler is seeded: the same seed and scores give the same points.

    Why not Ray Tune: a trial here is one candidate scored in well under a second by an actor
    that already holds θ0, the task vectors and the validation data (on the fast path, a batch
    of thousands scored in one process). As Tune trials each candidate would be its own
    trainable with Tune's per-trial bookkeeping, and its schedulers stop trials between
    training iterations, which a one-shot score does not have. Optuna's sampler is the only
    part we need; the fan-out stays on the scorer actors.
    """
    import warnings

    import optuna

    if budget is None:
        raise SpecError("merge.search.strategy bayesian needs merge.search.budget (candidates)")
    low, high = float(min(grid)), float(max(grid))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            constant_liar=True,
            n_startup_trials=max(2, min(10, budget // 4)),
        )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    scores: dict[Point, float] = {}
    for _ in range(budget * 20):  # repeated proposals cost no budget; this bounds them
        if len(scores) >= budget:
            break
        trials = [study.ask() for _ in range(min(batch, budget - len(scores)))]
        points = [
            tuple(round(t.suggest_float(f"alpha_{i}", low, high), 6) for i in range(dims))
            for t in trials
        ]
        fresh = list(dict.fromkeys(p for p in points if p not in scores))
        if fresh:
            scores.update(zip(fresh, evaluate(fresh), strict=True))
        for trial, point in zip(trials, points, strict=True):
            study.tell(trial, scores[point])
    return scores


STRATEGIES: dict[str, SearchStrategy] = {
    "coordinate_ascent": coordinate_ascent,
    "grid": full_grid,
    "bayesian": bayesian,
}

"""Successive halving over validation rows (Jamieson & Talwalkar, AISTATS 2016).

Every candidate is first scored on a small subset of each task's validation rows; the best 1/η
go on to a subset η times larger, and so on until at most η candidates remain, which are scored
on the full validation split. Pure functions: the schedule (how many candidates on how many
rows at each rung) and the seeded, stratified subset of rows a rung reads.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from storage.errors import SpecError


@dataclass(frozen=True)
class Rung:
    """``candidates`` scored on ``rows[task]`` validation rows of each task."""

    candidates: int
    rows: dict[str, int]

    @property
    def cost(self) -> int:
        """Validation rows this rung scores, summed over its candidates and tasks."""
        return self.candidates * sum(self.rows.values())


def survivor_counts(candidates: int, eta: int) -> list[int]:
    """Candidates per rung: n, ⌈n/η⌉, ⌈n/η²⌉, … down to the first count ≤ η (the last rung)."""
    counts = [candidates]
    while counts[-1] > eta:
        counts.append(math.ceil(counts[-1] / eta))
    return counts


def halving_schedule(
    candidates: int, rows: dict[str, int], eta: int = 3, budget: int | None = None
) -> list[Rung]:
    """The rungs of one successive-halving search; the last one reads every validation row.

    ``rows``: each task's validation rows. Rung k of K reads ⌈N_t / η^(K−k)⌉ rows of task t (at
    least one). When that schedule costs more than ``budget`` rows, the subset rungs shrink by a
    common factor (the full last rung stays) until it fits; a budget too small even for one row
    per task at every subset rung plus the last rung is refused.
    """
    counts = survivor_counts(candidates, eta)
    last = len(counts) - 1

    def plan(scale: float) -> list[Rung]:
        return [
            Rung(
                count,
                {
                    task: size
                    if k == last
                    else max(1, min(size, math.ceil(scale * size / eta ** (last - k))))
                    for task, size in rows.items()
                },
            )
            for k, count in enumerate(counts)
        ]

    rungs = plan(1.0)
    if budget is None or total_cost(rungs) <= budget:
        return rungs
    smallest = total_cost(plan(0.0))
    if smallest > budget:
        raise SpecError(
            f"merge.search.budget {budget} validation rows cannot cover successive halving's "
            f"smallest schedule for {candidates} candidates ({smallest} rows: one row per task "
            f"at each of the {last} subset rungs, then {counts[-1]} candidates on the full "
            f"split of {sum(rows.values())} rows): raise the budget to at least {smallest} or "
            "search fewer candidates"
        )
    low, high = 0.0, 1.0  # plan(low) fits, plan(high) does not; the cost grows with the scale
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if total_cost(plan(middle)) <= budget else (low, middle)
    return plan(low)


def total_cost(rungs: Sequence[Rung]) -> int:
    return sum(rung.cost for rung in rungs)


def stratified_rows(labels: np.ndarray, count: int, seed: Sequence[int] | int) -> np.ndarray:
    """Sorted indices of ``count`` rows drawn with ``seed``, stratified by ``labels``.

    Each class gets its share of ``count`` (largest remainders first, ties to the smaller class
    index); within a class the order is one seeded permutation, so with the same seed a larger
    subset holds a smaller one wherever the class shares allow. Every row when ``count`` ≥ all.
    """
    size = len(labels)
    if count >= size:
        return np.arange(size)
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    quota = np.bincount(inverse, minlength=len(classes)) * count / size
    shares = np.floor(quota).astype(int)
    extra = count - int(shares.sum())
    for index in np.argsort(-(quota - shares), kind="stable")[:extra]:
        shares[index] += 1
    picks = []
    for index in range(len(classes)):
        members = np.flatnonzero(inverse == index)
        picks.append(members[rng.permutation(len(members))][: shares[index]])
    return np.sort(np.concatenate(picks))


def uniform_rows(size: int, count: int, seed: Sequence[int] | int) -> np.ndarray:
    """Sorted indices of ``count`` of ``size`` rows, a seeded uniform draw (for rows without a
    class, as a causal LM's); with the same seed a larger subset holds a smaller one."""
    if count >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).permutation(size)[:count])


def validation_subset(
    task: str, labels: np.ndarray, num_classes: int, count: int, seed: int
) -> np.ndarray:
    """The rows of ``task``'s validation split a rung of ``count`` rows reads: stratified by
    class for a classifier, uniform for rows without classes (``num_classes`` 0). The task's
    name enters the seed, so tasks of the same size do not share their draw."""
    seeds = (seed, zlib.crc32(task.encode()))
    if num_classes > 0:
        return stratified_rows(labels, count, seeds)
    return uniform_rows(len(labels), count, seeds)

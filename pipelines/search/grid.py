"""Stage 5's grid search: score every candidate on validation, reusing stored scores.

It is also each rung of successive halving (:mod:`pipelines.search.halving`); every score goes
through the run's :class:`~pipelines.search.scorebook.ScoreBook`, so a stored one is reused and
only the candidates without one go to the scorer pool.
"""

from __future__ import annotations

from typing import Any

from pipelines.search.pool import ScorerPool
from pipelines.search.scorebook import ScoreBook
from pipelines.search.selection import candidate_row, objective_scores
from pipelines.spec.plan import Candidate, Plan


def grid_search(
    plan: Plan,
    pool: ScorerPool,
    finetuned_val: dict[str, float],
    candidates: list[Candidate] | None = None,
    rows: dict[str, int] | None = None,
    label: str = "merge search",
    book: ScoreBook | None = None,
) -> list[dict[str, Any]]:
    """Rows of ``candidates`` (default: the plan's) on validation; ``rows``: score on that many
    validation rows per task (a successive-halving rung). Scores in ``book`` are reused; only
    the candidates without one are scored (and added to it)."""
    candidates = list(plan.candidates) if candidates is None else candidates
    seed = plan.spec.merge.search.seed
    book = book or ScoreBook("")
    how = {"split": "val", "rows": rows, "seed": seed}
    found, missing = book.split(candidates, **how)
    by_id: dict[str, dict[str, Any]] = {}
    for candidate in candidates:
        if candidate.id in found:
            accuracy = found[candidate.id]
            by_id[candidate.id] = candidate_row(
                candidate, accuracy, objective_scores(accuracy, finetuned_val)
            )

    def record(chunk: list[Candidate], scored: list[dict[str, Any]]) -> None:
        accuracies = [row["accuracy"] for row in scored]
        book.put_many(chunk, accuracies, **how)
        for candidate, accuracy in zip(chunk, accuracies, strict=True):
            by_id[candidate.id] = candidate_row(
                candidate, accuracy, objective_scores(accuracy, finetuned_val)
            )

    if missing:
        pool.score(
            missing, "val", None, rows, seed, progress=label, completed=len(found), done=record
        )
    return [by_id[c.id] for c in candidates]

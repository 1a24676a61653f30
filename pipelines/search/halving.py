"""Stage 5 by successive halving (``merge.search.strategy: successive_halving``).

The schedule and the row subsets are pure (:mod:`workers.search.halving`); this loop scores each
rung's candidates with the grid search on the scorer pool, ranks them by the search objective with
:func:`~pipelines.search.selection.rank_candidates` (its deterministic tie-breaks), and keeps the
best.

Why not Ray Tune's ASHA scheduler: a rung here is "the same candidates on more validation rows",
scored by actors that already hold θ0, the task vectors and the data; a Tune trial is a
trainable reporting between training iterations, each with its own process state and
bookkeeping. The home-made part is this loop and the schedule; the scoring is the grid's.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from pipelines.search.grid import grid_search
from pipelines.search.pool import ScorerPool
from pipelines.search.scorebook import ScoreBook
from pipelines.search.selection import rank_candidates
from pipelines.spec.plan import Candidate, Plan
from workers.search.halving import Rung, halving_schedule


def successive_halving(
    plan: Plan,
    pool: ScorerPool,
    finetuned_val: dict[str, float],
    console: Console,
    candidates: list[Candidate],
    keep: frozenset[str] = frozenset(),
    book: ScoreBook | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of every candidate (from the last rung it reached, with its ``rungs``) and the
    search info. Candidates whose id is in ``keep`` (the champion) survive every rung. Scores
    in ``book`` are reused (``rows_scored`` counts the rows the schedule scores, stored or
    not)."""

    settings = plan.spec.merge.search
    objective = plan.spec.merge.objective
    book = book or ScoreBook("")
    key = book.key("split_rows", split="val")
    full = book.get(key)
    if full is None:
        full = pool.split_rows("val")
        book.put(key, full)
    rungs = halving_schedule(len(candidates), full, settings.eta, settings.budget)
    alive = list(candidates)
    by_id: dict[str, dict[str, Any]] = {}
    history: dict[str, list[dict[str, Any]]] = {c.id: [] for c in candidates}
    for index, rung in enumerate(rungs):
        last = index == len(rungs) - 1
        label = f"merge search: rung {index + 1}/{len(rungs)}, {sum(rung.rows.values())} rows"
        subset = None if last else rung.rows
        rows = grid_search(plan, pool, finetuned_val, alive, subset, label, book)
        for row in rows:
            history[row["id"]].append(
                {"rows": sum(rung.rows.values()), "objective": row["objective"][objective]}
            )
            by_id[row["id"]] = row | {"full_split": last}
        if not last:
            alive = survivors(alive, rows, objective, rungs[index + 1].candidates, keep)
    for row_id, row in by_id.items():
        row["rungs"] = history[row_id]
        row["rows_scored"] = sum(step["rows"] for step in history[row_id])
    scored = sum(row["rows_scored"] for row in by_id.values())
    grid = len(candidates) * sum(full.values())
    console.print(
        f"successive halving: {scored} validation rows scored, {scored / grid:.2f}× the full "
        f"grid's {grid} ({len(rungs)} rungs, eta {settings.eta})"
    )
    info = {
        "strategy": "successive_halving",
        "eta": settings.eta,
        "budget": settings.budget,
        "rows_scored": scored,
        "rows_full_grid": grid,
        "rungs": [rung_info(rung) for rung in rungs],
    }
    return [by_id[c.id] for c in candidates], info


def check_budget(plan: Plan, val_rows: dict[str, int]) -> None:
    """Refuse a row budget too small for the plan's candidates before anything is fine-tuned
    (``val_rows``: each task's validation rows as loaded; tokenizing can only drop some). A
    warm start counts its champion's candidate, which the search may add."""
    search = plan.spec.merge.search
    if search.strategy == "successive_halving" and search.budget is not None:
        champion = 1 if search.warm_start == "champion" else 0
        halving_schedule(len(plan.candidates) + champion, val_rows, search.eta, search.budget)


def survivors(
    alive: list[Candidate],
    rows: list[dict[str, Any]],
    objective: str,
    count: int,
    keep: frozenset[str],
) -> list[Candidate]:
    """The best ``count`` of ``alive`` in the search's order; a kept candidate takes the last
    place if it fell below it (so a rung never scores more candidates than planned)."""
    scores = {row["id"]: row["objective"] for row in rows}
    ranked = rank_candidates(alive, scores, objective)
    chosen = ranked[:count]
    for candidate in ranked[count:]:
        if candidate.id in keep:
            dropped = [c for c in reversed(chosen) if c.id not in keep]
            if dropped:
                chosen.remove(dropped[0])
                chosen.append(candidate)
    return chosen


def rung_info(rung: Rung) -> dict[str, Any]:
    return {"candidates": rung.candidates, "rows": rung.rows, "cost": rung.cost}

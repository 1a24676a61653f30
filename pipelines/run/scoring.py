"""Stages 5-6 on the scorer actors: start them, fan candidates out over them, score the best.

The grid search (`search`) is also each rung of successive halving
(`pipelines.search.halving`); every score goes through the run's
:class:`~pipelines.search.scorebook.ScoreBook`, so a stored one is reused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ray
from rich.console import Console

from pipelines.report.progress import progress_bar
from pipelines.run.raysession import get, wait_any
from pipelines.run.scheduling import actor_options
from pipelines.search.scorebook import ScoreBook, score_context
from pipelines.search.selection import candidate_row, objective_scores
from pipelines.spec.plan import Candidate, Plan
from pipelines.spec.search import resolve_search
from pipelines.stages.search import CandidateScorer
from pipelines.stages.tangent_search import TangentScorer
from storage.runs import read_scores


def start_scorers(
    plan: Plan,
    store_cfg: dict[str, Any],
    base_key: str,
    base_meta: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
) -> list[Any]:
    specs = {
        name: {"key": info["key"], "dataset": plan.tasks[plan.task_names.index(name)].dataset}
        for name, info in tasks.items()
    }
    # Never more one-CPU actors than the cluster has CPUs: the extra ones would never start,
    # and the candidates handed to them would wait forever.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = max(1, min(plan.spec.merge.num_actors, len(plan.candidates), cpus))
    settings = resolve_search(plan.spec)
    if settings.tangent:
        count = 1 if settings.all_fast else count
        actor = ray.remote(**actor_options(plan))(TangentScorer)
        args = (store_cfg, base_key, base_meta, specs, plan.evaluation, plan.finetune["mode"])
    else:
        actor = ray.remote(**actor_options(plan))(CandidateScorer)
        args = (store_cfg, base_key, base_meta, specs, plan.evaluation)
    return [actor.remote(*args) for _ in range(count)]


def search(
    plan: Plan,
    scorers: list[Any],
    finetuned_val: dict[str, float],
    console: Console,
    candidates: list[Candidate] | None = None,
    rows: dict[str, int] | None = None,
    label: str = "merge search",
    book: ScoreBook | None = None,
) -> list[dict[str, Any]]:
    """Stage 5: fan candidates (default: the plan's) out over the scorer actors in small chunks;
    ``rows``: score on that many validation rows per task (a successive-halving rung). Scores
    in ``book`` are reused; only the candidates without one are scored (and added to it)."""
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
    if not missing:
        return [by_id[c.id] for c in candidates]
    size = max(1, math.ceil(len(missing) / (len(scorers) * 4)))
    chunks = [missing[i : i + size] for i in range(0, len(missing), size)]
    pending = {
        scorers[i % len(scorers)].score.remote(chunk, "val", None, rows, seed): chunk
        for i, chunk in enumerate(chunks)
    }
    with progress_bar(console) as progress:
        bar = progress.add_task(label, total=len(candidates), completed=len(found))
        while pending:
            done = wait_any(list(pending))
            chunk = pending.pop(done[0])
            scored = [row["accuracy"] for row in get(done[0], "merge search")]
            book.put_many(chunk, scored, **how)
            for candidate, accuracy in zip(chunk, scored, strict=True):
                by_id[candidate.id] = candidate_row(
                    candidate, accuracy, objective_scores(accuracy, finetuned_val)
                )
            progress.advance(bar, len(chunk))
    return [by_id[c.id] for c in candidates]


class Scorers:
    """The scorer actors, started (with Ray) the first time a score is not in the book."""

    def __init__(self, start: Callable[[], list[Any]]) -> None:
        self._start, self._actors = start, None

    @property
    def actors(self) -> list[Any]:
        if self._actors is None:
            self._actors = self._start()
        return self._actors

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, index: int) -> Any:
        return self.actors[index]

    def close(self) -> None:
        for actor in self._actors or []:
            ray.kill(actor)
        self._actors = []


def score_best(
    scorers: Scorers, book: ScoreBook, best: Candidate, metric: str | None, what: str
) -> dict[str, float]:
    """Stage 6: the chosen candidate's per-task score on test (the search metric, or
    ``metric``), from the book if it holds it."""
    key = book.candidate_key(best, "test", metric)
    accuracy = book.get(key)
    if accuracy is None:
        accuracy = get(scorers[0].score.remote([best], "test", metric), what)[0]["accuracy"]
        book.put(key, accuracy)
    return accuracy


def open_score_book(
    store: Any,
    previous_run: str | None,
    run_id: str,
    version: str,
    base_meta: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
    plan: Plan,
) -> ScoreBook:
    """The scores this run may reuse: its pipeline's previous run's (``previous_run``) and its
    own earlier start's (a resumed run), under this run's score context."""
    context = score_context(version, base_meta, tasks, plan.evaluation, plan.finetune["mode"])
    known = read_scores(store, run_id)
    if previous_run is not None:
        known = read_scores(store, previous_run) | known
    return ScoreBook(context, known)

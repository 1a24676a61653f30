"""Stages 5-6 on the scorer actors (started by the DAG): fan candidates out, score the best.

:class:`Scorers` is the :class:`~pipelines.search.pool.ScorerPool` the search calls: it holds
the Ray handles, waits on them and turns remote failures into mergeline errors, so the search
itself never touches Ray.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import ray
from rich.console import Console

from pipelines.report.progress import progress_bar
from pipelines.run.raysession import get, wait_any
from pipelines.search.pool import ChunkDone, ScorerPool
from pipelines.search.scorebook import ScoreBook, score_context
from pipelines.spec.plan import Candidate, Plan
from storage.runs import read_scores


class Scorers:
    """The scorer actors as the search's :class:`~pipelines.search.pool.ScorerPool`, started
    (with Ray) the first time a score is not in the book."""

    def __init__(self, start: Callable[[], list[Any]], console: Console) -> None:
        self._start, self._actors = start, None
        self.console = console

    @property
    def actors(self) -> list[Any]:
        if self._actors is None:
            self._actors = self._start()
        return self._actors

    def score(
        self,
        candidates: list[Candidate],
        split: str = "val",
        metric: str | None = None,
        rows: dict[str, int] | None = None,
        seed: int = 0,
        *,
        what: str = "merge search",
        progress: str | None = None,
        completed: int = 0,
        done: ChunkDone | None = None,
    ) -> list[dict[str, Any]]:
        """Small chunks of ``candidates`` spread round-robin over the actors, each recorded
        (``done``) as soon as it is back; rows in the candidates' order."""
        if not candidates:
            return []
        actors = self.actors
        size = max(1, math.ceil(len(candidates) / (len(actors) * 4)))
        chunks = [candidates[i : i + size] for i in range(0, len(candidates), size)]
        pending = {
            actors[i % len(actors)].score.remote(chunk, split, metric, rows, seed): i
            for i, chunk in enumerate(chunks)
        }
        scored: list[list[dict[str, Any]]] = [[] for _ in chunks]
        bar = progress_bar(self.console) if progress is not None else None
        with bar if bar is not None else contextlib.nullcontext():
            if bar is not None:
                task = bar.add_task(
                    progress, total=completed + len(candidates), completed=completed
                )
            while pending:
                ready = wait_any(list(pending))
                index = pending.pop(ready[0])
                scored[index] = get(ready[0], what)
                if done is not None:
                    done(chunks[index], scored[index])
                if bar is not None:
                    bar.advance(task, len(chunks[index]))
        return [row for chunk in scored for row in chunk]

    def split_rows(self, split: str = "val") -> dict[str, int]:
        return get(self.actors[0].split_rows.remote(split), "merge search")

    def fast_score(self, candidates: list[Candidate], split: str = "val") -> list[dict[str, Any]]:
        return get(self.actors[0].fast_score.remote(candidates, split), "merge search")

    def fast_per_task_search(
        self,
        strategy: str,
        grid: list[float],
        budget: int | None,
        objective: str,
        finetuned: dict[str, float],
        seed: int = 0,
    ) -> list[tuple[dict[str, float], dict[str, float]]]:
        remote = self.actors[0].fast_per_task_search.remote(
            strategy, grid, budget, objective, finetuned, seed
        )
        return get(remote, "merge search")

    def close(self) -> None:
        for actor in self._actors or []:
            ray.kill(actor)
        self._actors = []


def score_best(
    pool: ScorerPool, book: ScoreBook, best: Candidate, metric: str | None, what: str
) -> dict[str, float]:
    """Stage 6: the chosen candidate's per-task score on test (the search metric, or
    ``metric``), from the book if it holds it."""
    key = book.candidate_key(best, "test", metric)
    accuracy = book.get(key)
    if accuracy is None:
        accuracy = pool.score([best], "test", metric, what=what)[0]["accuracy"]
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
    device = plan.spec.merge.resources.device
    mode = plan.finetune["mode"]
    context = score_context(version, base_meta, tasks, plan.evaluation, mode, device)
    known = read_scores(store, run_id)
    if previous_run is not None:
        known = read_scores(store, previous_run) | known
    return ScoreBook(context, known)

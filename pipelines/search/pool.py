"""What the search asks of the scorers: a pool of them, called synchronously.

The search decides which candidates to score and records what comes back; the pool spreads the
work over its scorers and waits for it. The run's pool is its Ray actors
(:class:`pipelines.run.scoring.Scorers`); the search imports neither Ray nor the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pipelines.spec.plan import Candidate

#: Called with each chunk of candidates and its rows as soon as that chunk is scored.
ChunkDone = Callable[[list[Candidate], list[dict[str, Any]]], None]


class ScorerPool(Protocol):
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
        """Rows ``{"id", "accuracy"}`` of ``candidates``, in order, scored by forward passes
        in small chunks over every scorer (``metric``, ``rows`` and ``seed`` as
        :meth:`pipelines.stages.search.CandidateScorer.score` reads them). ``progress``: the
        label of a progress bar over ``completed`` + these candidates; ``done`` is called as
        each chunk finishes; ``what`` names the stage in errors."""
        ...

    def split_rows(self, split: str = "val") -> dict[str, int]:
        """Rows of ``split`` per task, as the scorers read them."""
        ...

    def fast_score(self, candidates: list[Candidate], split: str = "val") -> list[dict[str, Any]]:
        """Rows ``{"id", "accuracy"}`` of linear-in-τ candidates, by the tangent fast path."""
        ...

    def fast_per_task_search(
        self,
        strategy: str,
        grid: list[float],
        budget: int | None,
        objective: str,
        finetuned: dict[str, float],
        seed: int = 0,
    ) -> list[tuple[dict[str, float], dict[str, float]]]:
        """(coefficients, per-task val accuracy) of every point a per-task strategy evaluated
        on the fast path."""
        ...

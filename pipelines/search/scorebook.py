"""Candidate scores keyed by everything they depend on: nothing changed, nothing scored.

A score is one candidate's per-task result on one split. Its key digests

* the run-wide inputs (:func:`score_context`): the code version, the base model's digest and
  config, every task's task-vector sha256 and data digest, the evaluation settings (split
  seed, fractions, batch size, metric) and the fine-tune mode (linear task vectors are scored
  as the linearized model);
* and the score's own: the candidate's method, params and coefficients, the split, the
  metric, the rows of a successive-halving rung and their seed, and how it was scored
  (forward passes, the linear fast path, the post-hoc surrogate).

Equal keys mean equal scores. A run reads the scores of its pipeline's previous run (and of
its own earlier start, when it resumes), scores only the candidates it finds no score for,
and stores every score it used beside itself (``runs/<run-id>/scores.json``). The book is
pure: reading and writing the file is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.spec.plan import Candidate
from storage.digest import digest_json

FORMAT = 1


def score_context(
    code_version: str,
    base_meta: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
    evaluation: dict[str, Any],
    mode: str,
    device: str = "cpu",
) -> str:
    """Digest of the inputs every score of a run shares. ``tasks``: task name -> the
    fine-tune stage's entry (``ref.sha256`` and ``meta.dataset_digest`` are read)."""
    return digest_json(
        {
            "format": FORMAT,
            "code_version": code_version,
            "base": {"digest": base_meta["digest"], "config": base_meta["config"]},
            "tasks": {
                name: {
                    "task_vector_sha256": info["ref"].sha256,
                    "dataset_digest": info["meta"].get("dataset_digest"),
                }
                for name, info in sorted(tasks.items())
            },
            "evaluation": evaluation,
            "mode": mode,
            # a GPU's kernels round differently: its scores are not the CPU's (and a CPU run's
            # keys stay what they were before scorers could use GPUs)
            **({"device": device} if device != "cpu" else {}),
        }
    )


@dataclass
class ScoreBook:
    """Scores found (``known``) and made (``fresh``) by this run, by score key."""

    context: str
    known: dict[str, Any] = field(default_factory=dict)
    fresh: dict[str, Any] = field(default_factory=dict)
    used: dict[str, Any] = field(default_factory=dict)

    def key(self, what: str, **parts: Any) -> str:
        return digest_json({"context": self.context, "what": what, **parts})

    def candidate_key(
        self,
        candidate: Candidate,
        split: str,
        metric: str | None = None,
        rows: dict[str, int] | None = None,
        seed: int = 0,
        by: str = "forward",
    ) -> str:
        return self.key(
            "candidate",
            method=candidate.method,
            params=candidate.params,
            coefficient=candidate.coefficient,
            split=split,
            metric=metric,
            rows=rows,
            seed=seed if rows is not None else None,
            by=by,
        )

    def get(self, key: str) -> Any | None:
        """The value of ``key`` found or made by this run, else None."""
        if key in self.fresh:
            return self.fresh[key]
        if key in self.known:
            self.used[key] = self.known[key]
            return self.known[key]
        return None

    def put(self, key: str, value: Any) -> None:
        self.fresh[key] = value
        self.used[key] = value

    def split(
        self, candidates: list[Candidate], **how: Any
    ) -> tuple[dict[str, Any], list[Candidate]]:
        """(candidate id -> stored value, the candidates without one), for one way of scoring
        (``how``: the keyword arguments of :meth:`candidate_key`)."""
        found: dict[str, Any] = {}
        missing = []
        for candidate in candidates:
            value = self.get(self.candidate_key(candidate, **how))
            if value is None:
                missing.append(candidate)
            else:
                found[candidate.id] = value
        return found, missing

    def put_many(self, candidates: list[Candidate], values: list[Any], **how: Any) -> None:
        for candidate, value in zip(candidates, values, strict=True):
            self.put(self.candidate_key(candidate, **how), value)

    def record(self) -> dict[str, Any]:
        """Every score this run used, found or made: what its ``scores.json`` stores."""
        return dict(self.used)

    def counts(self) -> dict[str, int]:
        """Entries this run reused from stored scores and computed itself (a candidate's score
        on one split, or a whole fast-path per-task search)."""
        return {
            "scores_reused": len(self.used) - len(self.fresh),
            "scores_computed": len(self.fresh),
        }

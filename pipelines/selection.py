"""Objective and deterministic choice of the best candidate (MERGING.md, coefficient search)."""

from __future__ import annotations

from typing import Any

from pipelines.plan import Candidate


def objective_scores(per_task: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """Mean accuracy and mean normalized accuracy (acc_t(merged) / acc_t(fine-tuned))."""
    normalized = [per_task[t] / max(finetuned[t], 1e-12) for t in per_task]
    return {
        "mean_normalized_accuracy": sum(normalized) / len(normalized),
        "mean_accuracy": sum(per_task.values()) / len(per_task),
    }


def choose_best(
    candidates: list[Candidate], scores: dict[str, dict[str, float]], objective: str
) -> Candidate:
    """Highest objective; ties broken by the smaller coefficient norm, then by method name."""

    def rank(candidate: Candidate) -> tuple[Any, ...]:
        return (-round(scores[candidate.id][objective], 12), candidate.coefficient_norm(), candidate.method, candidate.id)

    return min(candidates, key=rank)

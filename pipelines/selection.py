"""Objective and deterministic choice of the best candidate (MERGING.md, coefficient search)."""

from __future__ import annotations

import math
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
        return (
            -round(scores[candidate.id][objective], 12),
            candidate.coefficient_norm(),
            candidate.method,
            candidate.id,
        )

    return min(candidates, key=rank)


def decide_promotion(
    score: float, objective: str, tasks: str, champion_tags: dict[str, str] | None
) -> tuple[bool, str]:
    """Promote to champion only if the new test objective beats the current champion's.

    A champion over a different task set is not comparable: the new version replaces it.
    """
    if champion_tags is None:
        return True, "no champion yet"
    if champion_tags.get("mergeline.tasks") != tasks:
        return True, "the task set changed"
    previous = float(champion_tags.get("mergeline.test_objective", "nan"))
    if math.isnan(previous) or score > previous:
        return True, f"{objective} {score:.4f} beats the champion's {previous:.4f}"
    return (
        False,
        f"not promoted: {objective} {score:.4f} does not beat the champion's {previous:.4f}",
    )

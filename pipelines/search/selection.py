"""Objective and deterministic choice of the best candidate (MERGING.md, coefficient search)."""

from __future__ import annotations

import math
from typing import Any

from pipelines.spec.plan import Candidate


def objective_scores(per_task: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """Mean accuracy and mean normalized accuracy (acc_t(merged) / acc_t(fine-tuned))."""
    normalized = [per_task[t] / max(finetuned[t], 1e-12) for t in per_task]
    return {
        "mean_normalized_accuracy": sum(normalized) / len(normalized),
        "mean_accuracy": sum(per_task.values()) / len(per_task),
    }


def candidate_row(
    candidate: Candidate,
    accuracy: dict[str, float],
    objective: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """One scored candidate as the search records it (rows of candidates.json, MLflow)."""
    return {
        "id": candidate.id,
        "method": candidate.method,
        "params": candidate.params,
        "coefficient": candidate.coefficient,
        "accuracy": accuracy,
        "objective": objective,
        **extra,
    }


def choose_best(
    candidates: list[Candidate], scores: dict[str, dict[str, float]], objective: str
) -> Candidate:
    """Highest objective; ties broken by the smaller coefficient norm, then by method name."""
    return min(candidates, key=lambda candidate: rank_key(candidate, scores, objective))


def rank_candidates(
    candidates: list[Candidate], scores: dict[str, dict[str, float]], objective: str
) -> list[Candidate]:
    """Best first, in :func:`choose_best`'s order (successive halving keeps a prefix)."""
    return sorted(candidates, key=lambda candidate: rank_key(candidate, scores, objective))


def rank_key(
    candidate: Candidate, scores: dict[str, dict[str, float]], objective: str
) -> tuple[Any, ...]:
    return (
        -round(scores[candidate.id][objective], 12),
        candidate.coefficient_norm(),
        candidate.method,
        candidate.id,
    )


def decide_promotion(
    score: float,
    objective: str,
    tasks: str,
    champion_tags: dict[str, str] | None,
    min_improvement: float = 0.0,
    datasets: dict[str, str] | None = None,
) -> tuple[bool, str]:
    """Promote to champion only if the test objective beats the champion's by ``min_improvement``.

    Scores are comparable only on the same tasks (names and, where both versions record them,
    dataset digests) and the same objective: otherwise the champion stays, and the reason says
    how to move the alias by hand. ``tasks`` is the sorted task names joined by commas.
    """
    if champion_tags is None:
        return True, "no champion yet"
    by_hand = "move the 'champion' alias by hand if this version should serve"
    if champion_tags.get("mergeline.tasks") != tasks:
        shown = champion_tags.get("mergeline.tasks", "unknown")
        return False, f"not promoted: the champion serves tasks [{shown}], not [{tasks}]: {by_hand}"
    changed = [
        task
        for task, digest in (datasets or {}).items()
        if champion_tags.get(f"mergeline.task.{task}.dataset_digest", digest) != digest
    ]
    if changed:
        return False, f"not promoted: the datasets of {changed} changed: {by_hand}"
    if champion_tags.get("mergeline.objective", objective) != objective:
        previous_objective = champion_tags["mergeline.objective"]
        return False, f"not promoted: the champion was chosen by {previous_objective}: {by_hand}"
    previous = champion_score(champion_tags)
    if previous is None:
        return True, "the champion has no recorded test objective"
    gain = score - previous
    if score > previous and gain >= min_improvement:
        return True, f"{objective} {score:.4f} beats the champion's {previous:.4f} by {gain:.4f}"
    need = f" by at least {min_improvement:g}" if min_improvement > 0 else ""
    return (
        False,
        f"not promoted: {objective} {score:.4f} does not beat the champion's {previous:.4f}{need}",
    )


def champion_score(champion_tags: dict[str, str] | None) -> float | None:
    """The test objective recorded on a version, None if it has none."""
    try:
        value = float((champion_tags or {})["mergeline.test_objective"])
    except (KeyError, ValueError):
        return None
    return None if math.isnan(value) else value

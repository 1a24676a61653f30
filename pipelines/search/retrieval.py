"""Retrieval methods (registered with ``retrieval=True``, e.g. tall_masks): one model per task.

A retrieval candidate scores each task with that task's own model (tall_masks: θ0 + m_t ∘ τ_MTL),
built with the params ``task=t`` and that task's λ_t (:func:`~pipelines.spec.plan.task_params`), and
the model of task t depends only on λ_t. So the best per-task choice is read off the grid already
evaluated: for each task, the λ_t with the highest validation accuracy on that task (ties: the
smaller λ_t). That choice becomes one more candidate, ``lam: {task: λ_t}``, with exactly those
accuracies; it is marked ``derived`` (it needs no evaluation of its own). Both search modes decide
it here: the standard-mode grid (`pipelines.run.choose`) and the tangent-space search
(`pipelines.search.tangent.TangentSearch`, linear mode's linearized scores).
"""

from __future__ import annotations

import json
from typing import Any

from pipelines.search.selection import objective_scores
from pipelines.spec.plan import Candidate, is_retrieval


def per_task_lambda_candidates(
    rows: list[dict[str, Any]], finetuned_val: dict[str, float]
) -> list[tuple[Candidate, dict[str, Any]]]:
    """One derived candidate (and its row) per retrieval params group with several λ."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if is_retrieval(row["method"]) and isinstance(row["params"].get("lam"), int | float):
            rest = {k: v for k, v in row["params"].items() if k != "lam"}
            groups.setdefault(json.dumps([row["method"], rest], sort_keys=True), []).append(row)
    derived = []
    for key, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        method, rest = json.loads(key)
        lams, accuracy = {}, {}
        for task in members[0]["accuracy"]:
            best = max(members, key=lambda row: (row["accuracy"][task], -row["params"]["lam"]))
            lams[task], accuracy[task] = best["params"]["lam"], best["accuracy"][task]
        candidate = Candidate(method, rest | {"lam": lams}, 1.0)
        row = {
            "id": candidate.id,
            "method": method,
            "params": candidate.params,
            "coefficient": 1.0,
            "accuracy": accuracy,
            "objective": objective_scores(accuracy, finetuned_val),
            "derived": True,
        }
        derived.append((candidate, row))
    return derived


def best_by_method(rows: list[dict[str, Any]], objective: str) -> str:
    """One line: each method's best validation objective, best first."""
    best: dict[str, float] = {}
    for row in rows:
        best[row["method"]] = max(
            best.get(row["method"], float("-inf")), row["objective"][objective]
        )
    ranked = sorted(best.items(), key=lambda item: -item[1])
    return "best per method (val): " + ", ".join(f"{m} {v:.3f}" for m, v in ranked)

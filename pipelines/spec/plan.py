"""Spec -> Plan: pure, deterministic, testable without Ray.

The plan expands the merge search into concrete candidates with stable ids and freezes
everything each stage needs as plain data (it travels to Ray workers as dicts).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pipelines.spec.finetune import KEY_NEUTRAL_DEFAULTS
from pipelines.spec.load import expand_params
from pipelines.spec.pipeline import Spec
from storage.digest import digest_json

#: Bumped whenever the meaning of a stored artifact changes; part of every cache key.
FORMAT_VERSION = 1
#: A retrieval method's λ_t grid when the spec gives none (tall_masks', MERGING.md); each task
#: picks its own on val.
TALL_MASKS_LAMS = (0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass(frozen=True)
class Candidate:
    """One merge method + its params + its coefficient (shared float or per-task mapping)."""

    method: str
    params: dict[str, Any]
    coefficient: float | dict[str, float]

    @property
    def id(self) -> str:
        text = digest_json([self.method, self.params, self.coefficient])
        return f"{self.method}-{text[:10]}"

    def coefficient_norm(self) -> float:
        values = (
            self.coefficient.values() if isinstance(self.coefficient, dict) else [self.coefficient]
        )
        return sum(float(v) ** 2 for v in values) ** 0.5

    def coefficients_for(self, tasks: list[str]) -> dict[str, float]:
        if isinstance(self.coefficient, dict):
            return {task: float(self.coefficient[task]) for task in tasks}
        return {task: float(self.coefficient) for task in tasks}


@dataclass(frozen=True)
class TaskPlan:
    name: str
    dataset: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    spec: Spec
    spec_digest: str
    tasks: tuple[TaskPlan, ...]
    candidates: tuple[Candidate, ...]
    base_model: dict[str, Any]
    finetune: dict[str, Any]
    evaluation: dict[str, Any]

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def task(self, name: str) -> TaskPlan:
        """The task called ``name``."""
        return next(task for task in self.tasks if task.name == name)


def make_plan(spec: Spec) -> Plan:
    from workers.merge import get_method

    dump = spec.model_dump(mode="json")
    candidates: list[Candidate] = []
    for candidate in spec.merge.candidates:
        grid = candidate.params
        points = candidate.coefficient.points()
        method = get_method(candidate.method)
        if not method.uses_coefficient:  # ignored (or computed): one point
            points = [1.0]
        if method.retrieval:  # one model per task: λ_t is searched, not λ
            grid = {"lam": list(TALL_MASKS_LAMS)} | grid
        for params in expand_params(grid):
            for value in points:
                candidates.append(Candidate(candidate.method, params, value))
    unique = tuple(dict((c.id, c) for c in candidates).values())
    return Plan(
        spec=spec,
        spec_digest=digest_json(dump),
        tasks=tuple(TaskPlan(t["name"], t["dataset"]) for t in dump["tasks"]),
        candidates=unique,
        base_model=dump["base_model"],
        finetune=dump["finetune"],
        evaluation=dump["evaluation"],
    )


def is_retrieval(method: str) -> bool:
    """Whether the registered method ``method`` gives one model per task (tall_masks)."""
    from workers.merge import get_method

    return get_method(method).retrieval


def task_params(candidate: Candidate, tasks: list[str]) -> dict[str, dict[str, Any]] | None:
    """Each task's own params for a retrieval candidate (``task`` set, its λ_t picked from a
    per-task ``lam``), or None: the candidate is one merged model for every task."""
    if not is_retrieval(candidate.method):
        return None
    by_task = {}
    for task in tasks:
        params = dict(candidate.params) | {"task": task}
        if isinstance(params.get("lam"), dict):  # λ_t chosen per task on validation
            params["lam"] = params["lam"][task]
        by_task[task] = params
    return by_task


def statistics_needs(candidates: tuple[Candidate, ...]) -> list[tuple[str, int]]:
    """The (statistic, rows) pairs the candidates' data-aware methods read, sorted."""
    from workers.merge import get_method

    needs = set()
    for candidate in candidates:
        method = get_method(candidate.method)
        if method.statistics is not None:
            needs.add((method.statistics, method.validate_params(candidate.params).n))
    return sorted(needs)


#: Fine-tune settings that say how a task vector is computed, not what it is.
EXECUTION_ONLY = ("resources", "checkpoint_every", "on_task_failure")


def finetune_config_for_key(finetune: dict[str, Any]) -> dict[str, Any]:
    """The parts of the fine-tune config that change the task vector (not resources). Settings
    added later (adapter, precision, schedule, ...) enter only when they differ from the value
    that trains as before them, so stored vectors stay valid."""
    return {
        k: v
        for k, v in finetune.items()
        if k not in EXECUTION_ONLY
        and not (k in KEY_NEUTRAL_DEFAULTS and v == KEY_NEUTRAL_DEFAULTS[k])
    }


def task_vector_key(
    base_digest: str,
    dataset_digest: str,
    finetune: dict[str, Any],
    kind_settings: dict[str, Any] | None = None,
) -> str:
    """``kind_settings``: what else the task kind's stored vector depends on (how a causal
    LM's rows are rendered and scored); none for a classifier, whose keys stay as they were."""
    return digest_json(
        {
            "base": base_digest,
            "dataset": dataset_digest,
            "finetune": finetune_config_for_key(finetune),
            "format": FORMAT_VERSION,
        }
        | ({"kind": kind_settings} if kind_settings else {})
    )[:32]


def base_model_key(base_model: dict[str, Any], pretrain_dataset_digest: str | None) -> str:
    return digest_json(
        {"model": base_model, "data": pretrain_dataset_digest, "format": FORMAT_VERSION}
    )[:32]


def code_version() -> str:
    """The installed package version plus a digest of the code's own source files."""
    from importlib import metadata
    from pathlib import Path

    hasher = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in ("pipelines", "workers", "storage"):
        for path in sorted((root / package).rglob("*.py")):
            hasher.update(path.relative_to(root).as_posix().encode())
            hasher.update(path.read_bytes())
    try:
        version = metadata.version("mergeline")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"{version}+{hasher.hexdigest()[:12]}"

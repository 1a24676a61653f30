"""Surviving failures: which run a rerun continues, and what a task that fails for good does.

Killed workers are Ray's to retry (a fine-tune resumes from its checkpoint, see
:mod:`pipelines.stages.training`). A killed driver is handled here: the run key digests what
the run computes from, so running the same command again continues the same run id
(:mod:`storage.runstate`), and publishing is idempotent per run id. A task whose fine-tune fails
with its *own* error (a :class:`~storage.errors.MergelineError`, e.g. divergence) fails the run
naming the task, or with ``finetune.on_task_failure: skip`` is left out of the merge.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray
from pydantic import ValidationError

from pipelines.spec.pipeline import Spec
from pipelines.spec.plan import Plan, make_plan
from storage.digest import digest_json
from storage.errors import MergelineError, ServiceError, StorageError


class TaskFailedError(MergelineError):
    """A task's fine-tune failed for good (its own error, not the system's)."""


def run_key(plan: Plan, dataset_digests: dict[str, str], base_key: str) -> str:
    """What identifies "the same run": the spec and the digests of everything it reads."""
    return digest_json({"spec": plan.spec_digest, "datasets": dataset_digests, "base": base_key})[
        :32
    ]


def task_failed(task: str, error: MergelineError, policy: str, pending: list[Any]) -> str:
    """The reason to record for a task to skip, under ``skip`` and for the task's own error.

    Otherwise the other ``pending`` fine-tunes are cancelled and the run fails: with
    :class:`TaskFailedError` naming the task and the cause, or with ``error`` itself when it
    is not the task's own (an unusable store or service fails every task alike).
    """
    own = not isinstance(error, ServiceError | StorageError)
    reason = f"{type(error).__name__}: {error}"
    if own and policy == "skip":
        return reason
    for ref in pending:
        ray.cancel(ref)
    if not own:
        raise error
    raise TaskFailedError(
        f"fine-tune of task '{task}' failed: {reason} (finetune.on_task_failure: skip merges "
        "the other tasks without it)"
    ) from None


def without_tasks(plan: Plan, skipped: dict[str, str]) -> Plan:
    """The plan of the tasks that remain; the run keeps its spec digest (it is the same run)."""
    if not skipped:
        return plan
    remaining = [t for t in plan.spec.tasks if t.name not in skipped]
    if not remaining:
        raise TaskFailedError(
            "every task's fine-tune failed: "
            + "; ".join(f"'{task}': {reason}" for task, reason in skipped.items())
        )
    document: dict[str, Any] = plan.spec.model_dump(mode="json")
    document["tasks"] = [t.model_dump(mode="json") for t in remaining]
    try:
        spec = Spec.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        raise TaskFailedError(
            f"cannot merge without the skipped tasks {sorted(skipped)}: {first['msg']}"
        ) from None
    return dataclasses.replace(make_plan(spec), spec_digest=plan.spec_digest)

"""Where Ray runs the fine-tune tasks and search actors (only ``pipelines/`` knows Ray)."""

from __future__ import annotations

from typing import Any

from pipelines.spec.plan import Plan

#: Ray's retries of a fine-tune task whose worker died; each retry resumes from a checkpoint.
FINETUNE_RETRIES = 2


def finetune_options(plan: Plan) -> dict[str, Any]:
    """``.options()`` of a task's fine-tune job.

    With several workers the job only coordinates a Ray Train worker group, which holds the
    CPUs and GPUs; the job itself asks for none, so it cannot starve its own workers.
    """
    resources = plan.spec.finetune.resources
    coordinator = resources.num_workers > 1
    return {
        "num_cpus": 0 if coordinator else resources.num_cpus,
        "num_gpus": 0 if coordinator else resources.num_gpus,
        "max_retries": FINETUNE_RETRIES,
        "retry_exceptions": False,  # a task's own error is final; a dead worker is retried
        **_strategy(plan),
    }


def actor_options(plan: Plan) -> dict[str, Any]:
    """``.options()`` of a search actor (``merge.resources``)."""
    resources = plan.spec.merge.resources
    gpus = {"num_gpus": resources.num_gpus} if resources.num_gpus > 0 else {}
    return {"num_cpus": resources.num_cpus, **gpus, **_strategy(plan)}


def _strategy(plan: Plan) -> dict[str, Any]:
    spread = plan.spec.compute.scheduling == "spread"
    return {"scheduling_strategy": "SPREAD"} if spread else {}

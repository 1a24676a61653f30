"""Stages 1b-4 (driver side): the base model and one task vector per task, from the store or Ray."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from pipelines.report.progress import progress_bar
from pipelines.run.cache import trusted_artifacts
from pipelines.run.context import RunContext
from pipelines.run.dag import finetune_submitter, submit_pretrain
from pipelines.run.fingerprint import key_digests
from pipelines.run.raysession import get, wait_any
from pipelines.run.recovery import task_failed
from pipelines.spec.plan import Plan, task_vector_key
from pipelines.spec.refs import BaseModelRef, DatasetRef, TaskVectorRef
from pipelines.stages.base import kind_of
from pipelines.stages.jobs import FinetuneJob, PretrainJob
from storage.errors import MergelineError, SystemFailure
from storage.objectstore import open_store_from
from storage.taskvectors import base_model_prefix, find_task_vector, task_vector_prefix
from storage.tracking import DatasetInfo
from storage.tracking_guard import GuardedTracker
from workers.data import Splits


class TaskRecord(TypedDict):
    """How one task's vector came to be in this run (what the summary, the score book and the
    scorers read). ``ref`` and ``meta`` are absent only when the task was skipped."""

    key: str
    cache_hit: bool
    ref: NotRequired[TaskVectorRef]
    meta: NotRequired[dict[str, Any]]
    execution: NotRequired[dict[str, Any]]  # the fine-tune job's summary keys
    skipped: NotRequired[str]  # why, under finetune.on_task_failure: skip


def task_vectors(tasks: dict[str, TaskRecord]) -> dict[str, TaskVectorRef]:
    """Each fine-tuned task's vector, in the tasks' order."""
    return {name: record["ref"] for name, record in tasks.items()}


def prepare_base(ctx: RunContext, plan: Plan, key: str, input_dim: int) -> BaseModelRef:
    """Stage 1b: the base model from the store, else built (and pretrained) by a Ray task
    (``ctx.ready`` starts Ray when it has not started yet)."""
    store_cfg, console, ready = ctx.store_cfg, ctx.console, ctx.ready
    store = open_store_from(store_cfg)
    # A cached base that fails its checksum is reported and made invisible: the job rebuilds it.
    cached = trusted_artifacts(
        store, store_cfg, {"base": base_model_prefix(key)}, console, "base model"
    )
    if "base" in cached:
        base = BaseModelRef.from_artifact(key, cached["base"])
        console.print(f"base model {base.digest[:12]} (cache hit)")
        return base
    ready()
    with console.status("base model: pretraining (cached after the first run)"):
        job = PretrainJob(store_cfg, key, plan.base_model, plan.evaluation, input_dim)
        base, cache_hit = get(submit_pretrain(job), "base model")
    state = "cache hit" if cache_hit else f"pretrained in {base.meta['seconds']:.1f}s"
    console.print(f"base model {base.digest[:12]} ({state})")
    return base


def finetune_all(
    ctx: RunContext,
    plan: Plan,
    base: BaseModelRef,
    datasets: dict[str, Splits],
    digests: dict[str, str] | None = None,
) -> dict[str, TaskRecord]:
    """Stages 2-4: one Ray task per task whose vector is not in the store yet. ``digests``:
    :func:`key_digests` of ``datasets``, if the caller has them already; ``ctx.ready`` starts
    Ray before the first task (a run whose vectors are all stored does not need it)."""
    store, store_cfg, console, ready = ctx.store, ctx.store_cfg, ctx.console, ctx.ready
    submit = finetune_submitter(plan)
    results: dict[str, TaskRecord] = {}
    pending: dict[Any, str] = {}
    kind = kind_of(plan.base_model)
    digests = digests or key_digests(plan, datasets)
    keys = {
        t.name: task_vector_key(
            base.digest,
            digests[t.name],
            plan.finetune,
            kind.key_settings(plan.evaluation, t.dataset),
        )
        for t in plan.tasks
    }
    prefixes = {name: task_vector_prefix(key) for name, key in keys.items()}
    cached = trusted_artifacts(store, store_cfg, prefixes, console)  # corrupt ones: rebuilt
    for task in plan.tasks:
        key = keys[task.name]
        existing = cached.get(task.name)
        if existing is not None:
            ref = TaskVectorRef.from_artifact(task.name, key, existing)
            results[task.name] = {"key": key, "ref": ref, "meta": ref.meta, "cache_hit": True}
            continue
        ready()
        dataset = DatasetRef(task.name, task.dataset, digests[task.name])
        job = FinetuneJob(store_cfg, key, dataset, base, plan.finetune, plan.evaluation)
        pending[submit(job)] = task.name
        results[task.name] = {"key": key, "cache_hit": False}
    with progress_bar(console) as progress:
        bar = progress.add_task(
            "fine-tune", total=len(plan.tasks), completed=len(plan.tasks) - len(pending)
        )
        while pending:
            done = wait_any(list(pending))
            name = pending.pop(done[0])
            try:
                results[name]["execution"] = get(done[0], f"fine-tune '{name}'")
            except MergelineError as error:  # fail the run, or skip the task (on_task_failure)
                policy = plan.spec.finetune.on_task_failure
                results[name]["skipped"] = task_failed(name, error, policy, list(pending))
            progress.advance(bar)
    for name, info in results.items():
        if "skipped" in info:
            console.print(f"  {name}: skipped ({info['skipped']})", soft_wrap=True)
            continue
        if not info["cache_hit"]:
            found = find_task_vector(store, info["key"])
            if found is None:  # written by the job, gone now: the store lost it
                missing = store.url(task_vector_prefix(info["key"]))
                raise SystemFailure(f"fine-tune '{name}'", f"{missing} is gone from the store")
            info["ref"] = TaskVectorRef.from_artifact(name, info["key"], found)
            info["meta"] = found.meta
        console.print(
            f"  {name}: {'cache hit' if info['cache_hit'] else 'fine-tuned'} → {info['ref'].uri}"
        )
    return {task.name: results[task.name] for task in plan.tasks}


def log_finetune(
    tracker: GuardedTracker, name: str, info: TaskRecord, data: Splits, plan: Plan
) -> None:
    """One task's fine-tune as a tracking run: reference accuracies, dataset, lineage tags."""
    vector = info["ref"]
    meta = vector.meta
    metrics = {
        f"{kind}_{split}_accuracy": meta[kind][split]
        for kind in ("zero_shot", "finetuned")
        for split in ("val", "test")
    }
    metrics |= {"final_loss": meta["final_loss"], "seconds": meta["seconds"]}
    dataset = DatasetInfo(
        name=name,
        source=str(plan.task(name).dataset),
        digest=vector.dataset_digest,
        num_rows=data.num_rows,
    )
    tags = {
        "mergeline.task": name,
        "mergeline.task_vector_uri": vector.uri,
        "mergeline.task_vector_sha256": vector.sha256,
        "mergeline.cache_hit": str(info["cache_hit"]).lower(),
        "mergeline.mode": meta["mode"],
    }
    history = [{"step": i, "loss": v} for i, v in enumerate(meta.get("loss_history", []))]
    tracker.log_finetune(
        name, {k: v for k, v in meta["finetune"].items()}, metrics, dataset, tags, history
    )

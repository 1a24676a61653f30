"""Stages 2-4 for one task: linear-probe head, fine-tune, task vector, reference accuracies."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from pipelines.spec.plan import finetune_config_for_key
from pipelines.stages.base import load_task_data, open_base
from pipelines.stages.jobs import FinetuneJob
from pipelines.stages.training import (
    TrainRequest,
    build_model,
    train_task,
    trains_on_callers_base,
)
from storage.checkpoints import count_attempts, delete_checkpoints
from storage.objectstore import open_store_from
from storage.taskvectors import find_task_vector, write_adapter_task_vector, write_task_vector
from workers.adapters import (
    Factor,
    LoraDelta,
    factors_to_tensors,
    trained_factors,
    without_lora,
)
from workers.finetune.engine import Classifier, load_trained
from workers.search.evaluate import at_state, linearized_at

SPLITS = ("val", "test")


def run_finetune_job(job: FinetuneJob) -> dict[str, Any]:
    """Fine-tune one task and store its task vector; returns how it ran (see `execution`).

    Resumes from the task vector's newest checkpoint when an earlier attempt (a killed worker,
    a killed driver) left one. With ``resources.num_workers > 1`` the training itself runs on
    a Ray Train worker group that this task coordinates.
    """
    store = open_store_from(job.store)
    key, task, finetune, evaluation = job.key, job.task, job.finetune, job.evaluation
    existing = find_task_vector(store, key)
    if existing is not None:  # another run finished it meanwhile
        return execution(existing.meta, attempts=0, resumed_from_step=0)
    started = time.perf_counter()
    base = open_base(job.store, job.base.key, job.base.meta)
    backbone, theta0 = base.backbone, base.theta0
    data = load_task_data(base, job.dataset.source, evaluation, job.dataset.what)

    kind, settings = base.kind, base.settings(evaluation)
    metric = settings["metric"]
    head = kind.fit_head(
        at_state(backbone, theta0), data.x_train, data.y_train, data.num_classes, f"task '{task}'"
    )

    def scores(forward) -> dict[str, float]:
        return {s: kind.score(forward, head, *data.split(s), metric, settings) for s in SPLITS}

    at_theta0 = at_state(backbone, theta0)
    zero_shot = scores(at_theta0)

    request = TrainRequest(job, head)
    workers = finetune["resources"].get("num_workers", 1)
    if workers > 1:
        from pipelines.stages.train_ray import train_with_ray_train

        outcome = train_with_ray_train(request)
    else:
        # One worker on the CPU trains on this task's base: θ0 is held once in the process.
        outcome = train_task(request, base=base if trains_on_callers_base(request) else None)
    model = outcome.module
    if model is None:
        model = build_model(backbone, theta0, request)
        load_trained(model, outcome.model)
    outcome = replace(outcome, model={}, module=None)  # the trained values live in `model`
    history = outcome.history
    factors = None
    if finetune.get("adapter") is not None:  # LoRA: τ is s·B·A (linear mode: its tangent)
        factors = adapter_factors(model, finetune["mode"])
        del model  # its factors are all that is kept of the adapted model
        without_lora(backbone)  # trained in place: the plain base again, weights θ0
        view = LoraDelta(factors, theta0)
        if finetune["mode"] == "linear":
            tuned = linearized_at(backbone, theta0, dict(view))
        else:  # θ0 + τ tensor by tensor: no dense τ beside it
            tuned = at_state(backbone, {n: theta0[n] + view[n] for n in theta0})
    elif finetune["mode"] == "linear":  # train f(x; θ0) + J f(x; θ0)·δ; score that model too
        delta = network_of(model).task_vector()
        tuned = linearized_at(backbone, theta0, delta)
    else:
        # the trained backbone's own tensors: nothing trains it any more, so no copy
        theta = {k: v.detach() for k, v in backbone.state_dict().items()}
        tuned = at_state(backbone, theta)
        delta = {name: theta[name] - theta0[name] for name in theta0}
    finetuned = scores(tuned)
    report = {  # the kind's report metrics on test, e.g. a causal LM's exact match
        m: {
            "zero_shot": kind.score(at_theta0, head, *data.split("test"), m, settings),
            "finetuned": kind.score(tuned, head, *data.split("test"), m, settings),
        }
        for m in kind.report_metrics
        if m != metric
    }

    meta = {
        "kind": "task_vector",
        "task": task,
        "mode": finetune["mode"],
        "engine": outcome.engine,
        "workers": workers,
        "base_digest": job.base.digest,
        "dataset_digest": data.digest(),
        "num_classes": data.num_classes,
        "finetune": finetune_config_for_key(finetune),  # what made it, not how it ran
        "metric": metric,
        "zero_shot": zero_shot,
        "finetuned": finetuned,
        **({"report": report} if report else {}),
        "final_loss": history[-1]["loss"],
        "steps": len(history),
        "seconds": time.perf_counter() - started,
        "loss_history": [round(h["loss"], 5) for h in history[:: max(1, len(history) // 50)]],
    }
    if factors is not None:
        tensors = factors_to_tensors(factors)
        meta |= {
            "adapter": finetune["adapter"],
            "adapter_bytes": view.adapter_bytes,
            "dense_bytes": view.dense_bytes,
        }
        ref = write_adapter_task_vector(store, key, tensors, head, meta)
    else:
        ref = write_task_vector(store, key, delta, head, meta)
    attempts = count_attempts(store, key)
    delete_checkpoints(store, key)
    return execution(ref.meta, attempts, outcome.resumed_from_step)


def network_of(model: torch.nn.Module) -> torch.nn.Module:
    """The network a kind trains: the model itself, or a classifier's backbone."""
    return model.backbone if isinstance(model, Classifier) else model


def adapter_factors(model: torch.nn.Module, mode: str) -> dict[str, Factor]:
    """The trained adapter's task vector as LoRA factors under the base weights' names."""
    network = network_of(model)
    if mode != "linear":
        return trained_factors(network, {})
    return trained_factors(network.module, network.base_state(), network.task_vector())


def execution(meta: dict[str, Any], attempts: int, resumed_from_step: int) -> dict[str, Any]:
    """How a task vector came to be in this run: the summary's per-task execution keys."""
    return {
        "engine": meta.get("engine", "torch"),
        "workers": meta.get("workers", 1),
        "attempts": attempts,
        "resumed_from_step": resumed_from_step,
    }

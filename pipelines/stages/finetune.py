"""Stages 2-4 for one task: linear-probe head, fine-tune, task vector, reference accuracies."""

from __future__ import annotations

import time
from typing import Any

import torch

from pipelines.plan import finetune_config_for_key
from pipelines.stages.base import load_task_data, open_base
from pipelines.stages.training import TrainRequest, build_model, train_task
from storage.checkpoints import count_attempts, delete_checkpoints
from storage.errors import DataError
from storage.objectstore import open_store_from
from storage.taskvectors import find_task_vector, write_task_vector
from workers.finetune.engine import load_trained
from workers.models import fit_linear_probe
from workers.search.evaluate import accuracy, features_at, linearized_accuracy


def run_finetune_job(
    store_cfg: dict[str, Any],
    key: str,
    task: str,
    dataset: dict[str, Any],
    evaluation: dict[str, Any],
    base_key: str,
    base_meta: dict[str, Any],
    finetune: dict[str, Any],
) -> dict[str, Any]:
    """Fine-tune one task and store its task vector; returns how it ran (see `execution`).

    Resumes from the task vector's newest checkpoint when an earlier attempt (a killed worker,
    a killed driver) left one. With ``resources.num_workers > 1`` the training itself runs on
    a Ray Train worker group that this task coordinates.
    """
    store = open_store_from(store_cfg)
    existing = find_task_vector(store, key)
    if existing is not None:  # another run finished it meanwhile
        return execution(existing.meta, attempts=0, resumed_from_step=0)
    started = time.perf_counter()
    base = open_base(store_cfg, base_key, base_meta)
    backbone, theta0 = base.backbone, base.theta0
    data = load_task_data(base, dataset, evaluation, f"tasks[{task}].dataset")

    features = features_at(backbone, theta0, data.x_train)
    if not torch.isfinite(features).all():
        raise DataError(
            f"task '{task}': the base model's features of its training inputs are not finite: "
            "the inputs are too large for the model; standardise them"
        )
    head = fit_linear_probe(features.numpy(), data.y_train, data.num_classes)
    zero_shot = {s: accuracy(backbone, theta0, head, *data.split(s)) for s in ("val", "test")}

    request = TrainRequest(
        store_cfg, key, task, dataset, evaluation, base_key, base_meta, finetune, head
    )
    workers = finetune["resources"].get("num_workers", 1)
    if workers > 1:
        from pipelines.stages.train_ray import train_with_ray_train

        outcome = train_with_ray_train(request)
    else:
        outcome = train_task(request)
    model = build_model(backbone, theta0, request)
    load_trained(model, outcome.model)
    history = outcome.history
    if finetune["mode"] == "linear":  # train f(x; θ0) + J f(x; θ0)·δ; score that model too
        linearized = model.backbone
        delta = linearized.task_vector()
        finetuned = {
            s: linearized_accuracy(backbone, theta0, delta, head, *data.split(s))
            for s in ("val", "test")
        }
    else:
        theta = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        finetuned = {s: accuracy(backbone, theta, head, *data.split(s)) for s in ("val", "test")}
        delta = {name: theta[name] - theta0[name] for name in theta0}

    meta = {
        "kind": "task_vector",
        "task": task,
        "mode": finetune["mode"],
        "engine": outcome.engine,
        "workers": workers,
        "base_digest": base_meta["digest"],
        "dataset_digest": data.digest(),
        "num_classes": data.num_classes,
        "finetune": finetune_config_for_key(finetune),  # what made it, not how it ran
        "zero_shot": zero_shot,
        "finetuned": finetuned,
        "final_loss": history[-1]["loss"],
        "steps": len(history),
        "seconds": time.perf_counter() - started,
        "loss_history": [round(h["loss"], 5) for h in history[:: max(1, len(history) // 50)]],
    }
    ref = write_task_vector(store, key, delta, head, meta)
    attempts = count_attempts(store, key)
    delete_checkpoints(store, key)
    return execution(ref.meta, attempts, outcome.resumed_from_step)


def execution(meta: dict[str, Any], attempts: int, resumed_from_step: int) -> dict[str, Any]:
    """How a task vector came to be in this run: the summary's per-task execution keys."""
    return {
        "engine": meta.get("engine", "torch"),
        "workers": meta.get("workers", 1),
        "attempts": attempts,
        "resumed_from_step": resumed_from_step,
    }

"""Stages 2-4 for one task: linear-probe head, fine-tune, task vector, reference accuracies."""

from __future__ import annotations

import time
from typing import Any

from pipelines.stages.base import load_base
from storage.objectstore import open_store
from storage.taskvectors import find_task_vector, write_task_vector
from workers.data import load_dataset
from workers.finetune import TrainConfig, train
from workers.models import build_backbone, fit_linear_probe
from workers.search.evaluate import accuracy, features_at


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
    """Fine-tune one task and store its task vector; returns the artifact's manifest meta."""
    store = open_store(store_cfg["uri"], store_cfg.get("endpoint_url"))
    existing = find_task_vector(store, key)
    if existing is not None:  # another run finished it meanwhile
        return existing.meta
    started = time.perf_counter()
    data = load_dataset(dataset, evaluation, f"tasks[{task}].dataset")
    theta0 = load_base(store_cfg, base_key)
    backbone = build_backbone(base_meta["config"], base_meta["input_dim"])
    backbone.load_state_dict(theta0)

    head = fit_linear_probe(
        features_at(backbone, theta0, data.x_train).numpy(), data.y_train, data.num_classes
    )
    zero_shot = {s: accuracy(backbone, theta0, head, *data.split(s)) for s in ("val", "test")}

    config = TrainConfig(
        finetune["steps"],
        finetune["batch_size"],
        finetune["lr"],
        finetune.get("weight_decay", 0.0),
        finetune.get("seed", 0),
    )
    history = train(backbone, head, data.x_train, data.y_train, config, f"task '{task}'")
    theta = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    finetuned = {s: accuracy(backbone, theta, head, *data.split(s)) for s in ("val", "test")}
    delta = {name: theta[name] - theta0[name] for name in theta0}

    meta = {
        "kind": "task_vector",
        "task": task,
        "mode": finetune["mode"],
        "engine": "torch",
        "base_digest": base_meta["digest"],
        "dataset_digest": data.digest(),
        "num_classes": data.num_classes,
        "finetune": {k: v for k, v in finetune.items() if k != "resources"},
        "zero_shot": zero_shot,
        "finetuned": finetuned,
        "final_loss": history[-1]["loss"],
        "steps": len(history),
        "seconds": time.perf_counter() - started,
        "loss_history": [round(h["loss"], 5) for h in history[:: max(1, len(history) // 50)]],
    }
    ref = write_task_vector(store, key, delta, head, meta)
    return ref.meta

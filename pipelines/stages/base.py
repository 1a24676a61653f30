"""Stage 1 (part): the base model θ0: pretrained once on its own data, cached in the store."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from storage.artifacts import find_artifact
from storage.digest import digest_state
from storage.objectstore import open_store_from
from storage.taskvectors import base_model_prefix, read_base_model, write_base_model
from workers.data import load_dataset
from workers.finetune import TrainConfig, train
from workers.models import build_backbone


def pretrain_base_job(
    store_cfg: dict[str, Any],
    key: str,
    base_model: dict[str, Any],
    evaluation: dict[str, Any],
    input_dim: int,
) -> dict[str, Any]:
    """Build (and pretrain, if the spec asks) the base; returns its manifest meta."""
    store = open_store_from(store_cfg)
    existing = find_artifact(store, base_model_prefix(key))
    if existing is not None:
        return existing.meta | {"cache_hit": True}
    started = time.perf_counter()
    backbone = build_backbone(base_model, input_dim)
    pretrain = base_model.get("pretrain")
    metrics: dict[str, float] = {}
    if pretrain:
        data = load_dataset(pretrain["dataset"], evaluation, "base_model.pretrain.dataset")
        torch.manual_seed(int(base_model.get("seed", 0)))
        head = nn.Linear(backbone.feature_dim, data.num_classes)
        config = TrainConfig(
            pretrain["steps"],
            pretrain["batch_size"],
            pretrain["lr"],
            seed=int(base_model.get("seed", 0)),
        )
        history = train(backbone, head, data.x_train, data.y_train, config, "base_model.pretrain")
        with torch.no_grad():
            logits = head(backbone(torch.from_numpy(data.x_val)))
        metrics = {
            "pretrain_val_accuracy": float((logits.argmax(1).numpy() == data.y_val).mean()),
            "pretrain_final_loss": float(np.mean([h["loss"] for h in history[-20:]])),
        }
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    meta = {
        "kind": "base_model",
        "digest": digest_state(state),
        "config": base_model,
        "input_dim": input_dim,
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
    }
    write_base_model(store, key, state, meta)
    return meta | {"cache_hit": False}


def load_base(store_cfg: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    return read_base_model(open_store_from(store_cfg), key)

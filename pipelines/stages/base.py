"""Stage 1 (part): the base model θ0, built (and pretrained, or loaded) once, cached in the store.

Every later stage opens it with :func:`open_base`: the backbone at θ0, and how a task's raw
inputs become the backbone's inputs (a Hugging Face base tokenizes texts with its own
tokenizer, stored beside θ0 so workers on any node need nothing but the store).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.spec.refs import BaseModelRef
from pipelines.stages.datasets import load_dataset
from pipelines.stages.jobs import PretrainJob
from pipelines.stages.model_dirs import resolve_model_dir
from storage.artifacts import find_artifact
from storage.digest import digest_state
from storage.errors import DataError
from storage.localfiles import copy_artifact
from storage.nodecache import cache_home
from storage.objectstore import FsspecStore, open_store_from
from storage.shards import SafetensorsReader, TensorInfo
from storage.taskvectors import (
    base_model_file,
    base_model_prefix,
    find_task_vector,
    is_adapter,
    read_adapter_task_vector,
    read_base_model,
    read_head,
    read_task_vector,
    task_vector_file,
    write_base_model,
)
from workers.adapters import LoraDelta, factors_from_tensors
from workers.data import Splits
from workers.finetune import TrainConfig, train
from workers.kinds import TaskKind, get_kind
from workers.kinds.registry import TRANSFORMERS  # the base artifact's folder of HF files
from workers.models import build_backbone
from workers.models import huggingface as hf
from workers.models.weights import write_weights


def pretrain_base_job(job: PretrainJob) -> tuple[BaseModelRef, bool]:
    """Build (and pretrain, if the spec asks) the base; returns it and whether it was stored
    already (a cache hit)."""
    store = open_store_from(job.store)
    existing = find_artifact(store, base_model_prefix(job.key))
    if existing is not None:
        return BaseModelRef.from_artifact(job.key, existing), True
    started = time.perf_counter()
    base_model = job.base_model
    if base_model["source"] == "hf":
        state, extra, metrics, digest = _load_hf(base_model)
    else:
        state, metrics = _build_builtin(base_model, job.evaluation, job.input_dim)
        extra, digest = {}, digest_state(state)
    meta = {
        "kind": "base_model",
        "digest": digest,
        "config": base_model,
        "input_dim": job.input_dim,
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
    }
    written = write_base_model(store, job.key, state, meta, extra)
    return BaseModelRef(job.key, written.uri, written.sha256, meta), False


def _build_builtin(
    base_model: dict[str, Any], evaluation: dict[str, Any], input_dim: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
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
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}, metrics


def _load_hf(
    base_model: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, bytes], dict[str, float], str]:
    """θ0, the config and tokenizer files, metrics, and the digest the task vectors record
    (for an encoder :func:`hf.weights_digest`, which ``mergeline merge --base DIR`` computes
    too). A GGUF base is dequantized here, once: later stages read θ0 from the store."""
    gguf = base_model.get("gguf_file")
    directory = resolve_model_dir(
        base_model["model"], base_model.get("revision"), base_model.get("endpoint_url"), gguf
    )
    loaded = kind_of(base_model).load_pretrained(directory, base_model)
    state = {k: v.detach().clone().contiguous() for k, v in loaded.network.state_dict().items()}
    extra = {f"{TRANSFORMERS}/{name}": data for name, data in loaded.files.items()}
    metrics = {"parameters": float(sum(v.numel() for v in state.values()))}
    return state, extra, metrics, loaded.digest


def kind_of(config: dict[str, Any]) -> TaskKind:
    """The task kind of a base model's config (a builtin backbone classifies)."""
    return get_kind(config.get("kind", "classification"))


def load_base(store_cfg: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    return read_base_model(open_store_from(store_cfg), key)


@dataclass
class Base:
    """θ0 and the backbone built at it, plus what turns a task's raw inputs into its inputs."""

    backbone: nn.Module
    theta0: dict[str, torch.Tensor]
    kind: TaskKind
    tokenizer: Any = None
    max_length: int = 0

    def settings(self, evaluation: dict[str, Any]) -> dict[str, Any]:
        """What the kind's ``score`` reads: the evaluation section, its search metric (default:
        the kind's first) and the tokenizer."""
        metric = evaluation.get("metric") or self.kind.metrics[0]
        return dict(evaluation) | {"metric": metric, "tokenizer": self.tokenizer}

    def inputs(self, splits: Splits, what: str, dataset: dict[str, Any] | None = None) -> Splits:
        """Raw splits -> backbone inputs (texts tokenized the kind's way; features as they
        are). Rows the kind drops (``dataset.overflow: drop``) leave their labels too."""
        if self.tokenizer is None:
            if splits.is_text:
                raise DataError(f"{what}: holds texts but the base model has no tokenizer")
            return splits
        if not splits.is_text:
            raise DataError(f"{what}: the Hugging Face base reads texts: set text_column")
        encoded = {}
        for name in ("train", "val", "test"):
            x, y = splits.split(name)
            inputs, kept = self.kind.encode(
                x, self.tokenizer, self.max_length, dataset or {}, f"{what} ({name} split)"
            )
            encoded[name] = (inputs, y[kept])
        return Splits(*encoded["train"], *encoded["val"], *encoded["test"], splits.num_classes)


def open_base(store_cfg: dict[str, Any], key: str, base_meta: dict[str, Any]) -> Base:
    """The stored base model, ready to train or score (θ0 loaded, inputs prepared)."""
    theta0 = load_base(store_cfg, key)
    config = base_meta["config"]
    if config["source"] != "hf":
        backbone = build_backbone(config, base_meta["input_dim"])
        backbone.load_state_dict(theta0)
        return Base(backbone, theta0, kind_of(config))
    directory = base_files(store_cfg, key, base_meta)
    backbone = kind_of(config).from_files(directory, theta0, config)
    return Base(
        backbone, theta0, kind_of(config), hf.load_tokenizer(directory), int(config["max_length"])
    )


def open_base_streamed(
    store_cfg: dict[str, Any], key: str, base_meta: dict[str, Any], dtype: str | None = None
) -> tuple[Base, SafetensorsReader]:
    """The stored base as a scorer holds it: the backbone in ``dtype`` (default: θ0's own),
    its weights written tensor by tensor from θ0's node-local file, and a reader of that file
    for the merges. ``Base.theta0`` stays empty: θ0 is never a state dict in memory."""
    store = open_store_from(store_cfg)
    reader = SafetensorsReader(base_model_file(store, key))
    config = base_meta["config"]
    kind, tokenizer, max_length = kind_of(config), None, 0
    if config["source"] != "hf":
        backbone = build_backbone(config, base_meta["input_dim"])
    else:
        directory = base_files(store_cfg, key, base_meta)
        backbone = kind.from_files(directory, None, config)
        tokenizer, max_length = hf.load_tokenizer(directory), int(config["max_length"])
    floats = [info.dtype for info in reader.tensors.values() if info.dtype.is_floating_point]
    backbone.to(getattr(torch, dtype) if dtype else (floats[0] if floats else torch.float32))
    write_weights(backbone, ((name, reader.read(name)) for name in reader.names()))
    return Base(backbone.eval(), {}, kind, tokenizer, max_length), reader


def open_task_source(
    store_cfg: dict[str, Any], key: str, base: Mapping[str, TensorInfo]
) -> tuple[SafetensorsReader | LoraDelta, dict[str, torch.Tensor]]:
    """A stored task vector read tensor by tensor (its node-local file; an adapter's ΔW = s·B·A
    computed as each tensor is read), and its head. ``base``: θ0's names, dtypes and shapes."""
    store = open_store_from(store_cfg)
    adapter = _open_adapter(store, key, base)
    if adapter is not None:
        return adapter
    return SafetensorsReader(task_vector_file(store, key)), read_head(store, key)


def open_task_vector(
    store_cfg: dict[str, Any], key: str, theta0: dict[str, torch.Tensor]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """A stored task vector as a dense mapping over θ0's tensors, and its head. An adapter's
    is a :class:`LoraDelta`: each ΔW = s·B·A is computed only when a merge reads it."""
    store = open_store_from(store_cfg)
    adapter = _open_adapter(store, key, theta0)
    return adapter if adapter is not None else read_task_vector(store, key)


def _open_adapter(
    store: FsspecStore, key: str, base: Mapping[str, Any]
) -> tuple[LoraDelta, dict[str, torch.Tensor]] | None:
    """An adapter task vector as its :class:`LoraDelta` over ``base``'s tensors (names, dtypes,
    shapes), and its head; None for a dense task vector."""
    found = find_task_vector(store, key)
    if found is None or not is_adapter(found.meta):
        return None
    tensors, head = read_adapter_task_vector(store, key)
    where = store.url(f"task-vectors/{key}")
    return LoraDelta(factors_from_tensors(tensors, where), base), head


def load_task_data(base: Base, dataset: dict[str, Any], evaluation: dict[str, Any], what: str):
    return base.inputs(load_dataset(dataset, evaluation, what), what, dataset)


def base_files(store_cfg: dict[str, Any], key: str, base_meta: dict[str, Any]) -> Path:
    """A local folder with the base's HF config and tokenizer files (the store's own, if local)."""
    store = open_store_from(store_cfg)
    prefix = base_model_prefix(key)
    local = store.local_path(f"{prefix}/{TRANSFORMERS}")
    if local is not None and Path(local).is_dir():
        return Path(local)
    cache = cache_home()
    target = cache / "bases" / hashlib.sha256(store.url(prefix).encode()).hexdigest()[:24]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_artifact(store, prefix, target, folder=TRANSFORMERS)
    return target

"""Typed readers and writers for the store's artifacts: base models, task vectors, models.

Layout (DESIGN.md): ``task-vectors/<key>/{delta,head}.safetensors`` + ``manifest.json`` (an
adapter task vector holds ``adapter.safetensors``, its LoRA factors, instead of ``delta``);
``task-vectors/<key>/statistics/<kind>-n<rows>/statistics.safetensors`` (data statistics of
that task vector, for data-aware merge methods); ``base-models/<key>/model.safetensors``;
``models/<name>/<run-id>/model.safetensors`` + ``config.json``; ``runs/<run-id>/summary.json``.
Manifests are always written last.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from storage.artifacts import (
    ArtifactRef,
    find_artifact,
    invalidate_artifact,
    read_tensor_file,
    write_artifact,
)
from storage.errors import ArtifactError

# Re-exported: the serving code of models published before it moved imports it from here.
from storage.modeldir import merged_tensors as merged_tensors
from storage.modeldir import split_merged_tensors as split_merged_tensors
from storage.names import NAME_ADVICE, is_name
from storage.nodecache import local_file
from storage.objectstore import ObjectStore
from storage.quoting import quoted
from storage.staged import ArtifactFile, TensorFile

DENSE, ADAPTER = "delta.safetensors", "adapter.safetensors"  # a task vector's tensors
STATISTICS = "statistics.safetensors"  # a task vector's data statistics (regmean, fisher)


def task_vector_prefix(key: str) -> str:
    return f"task-vectors/{key}"


def base_model_prefix(key: str) -> str:
    return f"base-models/{key}"


def model_prefix(name: str, run_id: str) -> str:
    if not is_name(name):  # the spec refuses such names; this guards every other caller
        raise ArtifactError(f"model name {quoted(name)} is not safe as a store key: {NAME_ADVICE}")
    return f"models/{name}/{run_id}"


def write_task_vector(
    store: ObjectStore,
    key: str,
    delta: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> ArtifactRef:
    return _write_vector(store, key, DENSE, delta, head, meta)


def write_adapter_task_vector(
    store: ObjectStore,
    key: str,
    factors: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> ArtifactRef:
    """An adapter task vector: its factor tensors (``workers.adapters.factors`` layout) and the
    head; ``meta`` says ``format: lora`` and the adapter's and the dense vector's sizes."""
    return _write_vector(store, key, ADAPTER, factors, head, meta | {"format": "lora"})


def _write_vector(
    store: ObjectStore,
    key: str,
    name: str,
    tensors: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> ArtifactRef:
    files = {name: TensorFile(tensors), "head.safetensors": TensorFile(head)}
    return write_artifact(store, task_vector_prefix(key), files, meta)


def is_adapter(meta: dict[str, Any]) -> bool:
    """Whether a task vector's manifest meta describes LoRA factors rather than a dense delta."""
    return meta.get("format") == "lora"


def read_task_vector(
    store: ObjectStore, key: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A dense task vector and its head (an adapter's: :func:`read_adapter_task_vector`)."""
    prefix = task_vector_prefix(key)
    delta = read_tensor_file(store, prefix, DENSE)
    head = read_tensor_file(store, prefix, "head.safetensors")
    return delta, head


def task_vector_file(store: ObjectStore, key: str) -> Path:
    """A dense task vector's ``delta.safetensors`` on local disk, checked (node cache)."""
    return local_file(store, task_vector_prefix(key), DENSE)


def read_head(store: ObjectStore, key: str) -> dict[str, torch.Tensor]:
    """A task vector's head (small: read whole)."""
    return read_tensor_file(store, task_vector_prefix(key), "head.safetensors")


def read_adapter_task_vector(
    store: ObjectStore, key: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An adapter task vector's factor tensors and its head."""
    prefix = task_vector_prefix(key)
    factors = read_tensor_file(store, prefix, ADAPTER)
    head = read_tensor_file(store, prefix, "head.safetensors")
    return factors, head


def find_task_vector(store: ObjectStore, key: str) -> ArtifactRef | None:
    return find_artifact(store, task_vector_prefix(key))


def statistics_prefix(key: str, kind: str, rows: int) -> str:
    """Where a task vector's data statistics live: beside it, one artifact per kind and rows."""
    return f"{task_vector_prefix(key)}/statistics/{kind}-n{rows}"


def find_statistics(
    store: ObjectStore, key: str, kind: str, rows: int, task_vector_sha256: str
) -> ArtifactRef | None:
    """The stored statistics of exactly this task vector (its sha256), else None.

    Statistics left by an earlier task vector under the same key (one rebuilt after it was
    found corrupt) no longer match and are made invisible, so they are computed again."""
    prefix = statistics_prefix(key, kind, rows)
    found = find_artifact(store, prefix)
    if found is None:
        return None
    if found.meta.get("task_vector_sha256") != task_vector_sha256:
        invalidate_artifact(store, prefix)
        return None
    return found


def write_statistics(
    store: ObjectStore,
    key: str,
    kind: str,
    rows: int,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> ArtifactRef:
    """``statistics.safetensors`` ({tensor name: statistic}); ``meta`` names the task vector's
    sha256 (``task_vector_sha256``) they were computed from."""
    files = {STATISTICS: TensorFile(tensors)}
    meta = meta | {"kind": "statistics", "statistic": kind, "rows": rows}
    return write_artifact(store, statistics_prefix(key, kind, rows), files, meta)


def statistics_file(store: ObjectStore, key: str, kind: str, rows: int) -> Path:
    """A task vector's statistics file on local disk, checked (node cache)."""
    return local_file(store, statistics_prefix(key, kind, rows), STATISTICS)


def read_statistics(store: ObjectStore, key: str, kind: str, rows: int) -> dict[str, torch.Tensor]:
    prefix = statistics_prefix(key, kind, rows)
    return read_tensor_file(store, prefix, STATISTICS)


def write_base_model(
    store: ObjectStore,
    key: str,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> ArtifactRef:
    """θ0 as ``model.safetensors``; ``extra_files`` (e.g. a tokenizer) beside it."""
    files = {"model.safetensors": TensorFile(state), **(extra_files or {})}
    return write_artifact(store, base_model_prefix(key), files, meta)


def base_model_file(store: ObjectStore, key: str) -> Path:
    """θ0's ``model.safetensors`` on local disk, checked (node cache)."""
    return local_file(store, base_model_prefix(key), "model.safetensors")


def read_base_model(store: ObjectStore, key: str) -> dict[str, torch.Tensor]:
    prefix = base_model_prefix(key)
    return read_tensor_file(store, prefix, "model.safetensors")


def write_merged_model(
    store: ObjectStore,
    name: str,
    run_id: str,
    model: ArtifactFile,
    config: dict[str, Any],
    meta: dict[str, Any],
    extra_files: Mapping[str, ArtifactFile] | None = None,
) -> ArtifactRef:
    """``model.safetensors`` (backbone + ``heads.<task>.*``, see ``storage.modeldir``: a file
    the streaming writer wrote, or a ``TensorFile`` of :func:`merged_tensors`), ``config.json``,
    then extras."""
    files = {
        "model.safetensors": model,
        "config.json": json.dumps(config, indent=1, sort_keys=True).encode(),
        **(extra_files or {}),
    }
    return write_artifact(store, model_prefix(name, run_id), files, meta)


def write_summary(store: ObjectStore, run_id: str, summary: dict[str, Any]) -> str:
    key = f"runs/{run_id}/summary.json"
    store.put(key, json.dumps(summary, indent=1, sort_keys=False).encode())
    return store.url(key)

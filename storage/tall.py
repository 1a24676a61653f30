"""TALL-mask compressed task vectors in the store: τ_MTL once plus bit-packed per-task masks.

Layout of an artifact (manifest written last, as for every artifact)::

    multi_task.safetensors   τ_MTL under the original parameter names
    masks.safetensors        uint8 packed masks (workers.merge.pack_mask), named <task>/<name>
    manifest.json            meta.tall_masks = {lams, use_ties, shapes, compression}

A published tall_masks model also holds ``model.safetensors`` (θ0 backbone + heads) and
``config.json``. The model of task t is θ0 + m_t ∘ τ_MTL, rebuilt by
``workers.merge.compression.retrieve_task`` from what these readers return.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from storage.artifacts import ArtifactRef, find_artifact, read_tensor_file, write_artifact
from storage.errors import ArtifactError
from storage.modeldir import MASKS, MULTI_TASK, Masks, split_masks

# Re-exported: the serving code of models published before it moved imports it from here.
from storage.modeldir import read_tall_directory as read_tall_directory
from storage.objectstore import ObjectStore
from storage.staged import ArtifactFile, TensorFile


def tall_files(multi_task: dict[str, torch.Tensor], masks: Masks) -> dict[str, TensorFile]:
    """The two safetensors files that hold τ_MTL and the packed masks."""
    flat = {
        f"{task}/{name}": packed
        for task, by_name in masks.items()
        for name, packed in by_name.items()
    }
    return {MULTI_TASK: TensorFile(multi_task), MASKS: TensorFile(flat)}


def write_tall_artifact(
    store: ObjectStore,
    prefix: str,
    multi_task: dict[str, torch.Tensor],
    masks: Masks,
    info: dict[str, Any],
    meta: dict[str, Any] | None = None,
    extra_files: Mapping[str, ArtifactFile] | None = None,
) -> ArtifactRef:
    """Store τ_MTL and the masks; ``info`` (λ_t, use_ties, compression) goes to meta.tall_masks."""
    shapes = {name: list(tensor.shape) for name, tensor in multi_task.items()}
    full = {"kind": "tall_masks"} | dict(meta or {})
    full["tall_masks"] = dict(info) | {"shapes": shapes}
    files = dict(extra_files or {}) | tall_files(multi_task, masks)
    return write_artifact(store, prefix, files, full)


def read_tall_artifact(
    store: ObjectStore, prefix: str
) -> tuple[dict[str, torch.Tensor], Masks, dict[str, Any]]:
    """(τ_MTL, masks, meta.tall_masks) at ``prefix``, every file verified against the manifest."""
    ref = find_artifact(store, prefix)
    if ref is None or "tall_masks" not in ref.meta:
        raise ArtifactError(f"{store.url(prefix)}: no TALL-mask artifact there: check the URI")
    multi_task = read_tensor_file(store, prefix, MULTI_TASK)
    masks = split_masks(read_tensor_file(store, prefix, MASKS))
    return multi_task, masks, dict(ref.meta["tall_masks"])

"""Resumable fine-tune checkpoints in the object store.

Layout: ``checkpoints/<task-vector key>/step-<step>/`` holds one checkpoint's files and its
``manifest.json`` (written last, see :mod:`storage.artifacts`); with several workers each one
puts its own files (:func:`write_checkpoint_part`) and rank 0 writes the rest and the manifest,
which lists them all. ``attempts.json`` counts how
often training of that task vector started. A newer checkpoint replaces the older ones once its
manifest exists, so a crash at any moment leaves at least one complete checkpoint (or none yet).
Everything under the key goes away when the task vector is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from storage.artifacts import (
    ArtifactRef,
    invalidate_artifact,
    read_file,
    read_manifest,
    read_tensor_file,
    write_artifact,
    write_artifact_file,
)
from storage.errors import ArtifactError
from storage.objectstore import ObjectStore
from storage.staged import TensorFile

_STEP = "step-"
_ATTEMPTS = "attempts.json"


def checkpoint_prefix(key: str) -> str:
    return f"checkpoints/{key}"


def write_checkpoint(
    store: ObjectStore,
    key: str,
    step: int,
    files: dict[str, bytes | TensorFile],
    meta: dict[str, Any],
    written: dict[str, dict[str, Any]] | None = None,
) -> ArtifactRef:
    """Store the checkpoint after ``step`` steps, then drop the older ones; tensor files
    stream to the store (:func:`storage.artifacts.write_artifact`). ``written``: the files
    other workers already put there (:func:`write_checkpoint_part`), with their entries."""
    ref = write_artifact(store, _step_prefix(key, step), files, meta, written)
    for older in _steps(store, key):
        if older < step:
            _delete_artifact(store, _step_prefix(key, older))
    return ref


def write_checkpoint_part(
    store: ObjectStore, key: str, step: int, files: dict[str, bytes | TensorFile]
) -> dict[str, dict[str, Any]]:
    """One worker's own files of the checkpoint after ``step`` steps, invisible until the
    manifest names them; returns their manifest entries, for :func:`write_checkpoint`."""
    prefix = _step_prefix(key, step)
    return {name: write_artifact_file(store, prefix, name, data) for name, data in files.items()}


@dataclass(frozen=True)
class StoredTensorFile:
    """A tensor file of a stored checkpoint, read (streamed, memory-mapped and checked against
    the manifest, :func:`storage.artifacts.read_tensor_file`) only when its tensors are used."""

    store: ObjectStore
    prefix: str
    name: str

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        return read_tensor_file(self.store, self.prefix, self.name)


def latest_checkpoint(
    store: ObjectStore, key: str
) -> tuple[int, dict[str, bytes | StoredTensorFile]] | None:
    """(step, files) of the newest complete checkpoint whose small files are intact; None if
    there is none.

    ``.safetensors`` files come back as :class:`StoredTensorFile`, read only if a reader needs
    them (a worker reads only the parts that overlap its own), the others as bytes. A
    checkpoint whose small files fail their checksum is skipped for an older one.
    """
    for step in sorted(_steps(store, key), reverse=True):
        prefix = _step_prefix(key, step)
        manifest = read_manifest(store, prefix)
        if manifest is None:
            continue
        try:
            return step, {name: _read(store, prefix, name) for name in manifest["files"]}
        except ArtifactError:
            continue
    return None


def delete_checkpoint(store: ObjectStore, key: str, step: int) -> None:
    """Remove one checkpoint (e.g. one in a format this version no longer reads)."""
    _delete_artifact(store, _step_prefix(key, step))


def _step_prefix(key: str, step: int) -> str:
    return f"{checkpoint_prefix(key)}/{_STEP}{step:09d}"


def _read(store: ObjectStore, prefix: str, name: str) -> bytes | StoredTensorFile:
    if name.endswith(".safetensors"):
        return StoredTensorFile(store, prefix, name)
    return read_file(store, prefix, name)


def record_attempt(store: ObjectStore, key: str) -> int:
    """Count one more start of training for ``key``; returns the count including this one."""
    count = count_attempts(store, key) + 1
    store.put(f"{checkpoint_prefix(key)}/{_ATTEMPTS}", json.dumps({"count": count}).encode())
    return count


def count_attempts(store: ObjectStore, key: str) -> int:
    """How often training of ``key`` started since its task vector was last written."""
    try:
        return int(json.loads(store.get(f"{checkpoint_prefix(key)}/{_ATTEMPTS}"))["count"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0


def delete_checkpoints(store: ObjectStore, key: str) -> None:
    """Remove every checkpoint of ``key`` and its attempt count (after the task vector exists)."""
    for step in _steps(store, key):
        _delete_artifact(store, _step_prefix(key, step))
    store.delete(f"{checkpoint_prefix(key)}/{_ATTEMPTS}")
    _remove_empty_directory(store, checkpoint_prefix(key))


def _steps(store: ObjectStore, key: str) -> list[int]:
    names = [n.removeprefix(_STEP) for n in store.list(checkpoint_prefix(key)) if n[:5] == _STEP]
    return [int(step) for step in names if step.isdigit()]


def _delete_artifact(store: ObjectStore, prefix: str) -> None:
    """Its manifest first (invisible from then on), then its files and any a crash left."""
    manifest = read_manifest(store, prefix)
    invalidate_artifact(store, prefix)
    names = set((manifest or {}).get("files", {})) | set(store.list(prefix))
    for name in sorted(names):
        store.delete(f"{prefix}/{name}")
    _remove_empty_directory(store, prefix)


def _remove_empty_directory(store: ObjectStore, prefix: str) -> None:
    """Object stores have no directories; a local one keeps empty ones unless removed.

    Only ``prefix``'s own directory: ``checkpoints/`` itself stays, since other fine-tunes
    create their directories in it at any moment.
    """
    path = store.local_path(prefix)
    if path is None:
        return
    try:
        os.rmdir(path)
    except OSError:  # not empty (or gone): leave it
        pass

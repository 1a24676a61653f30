"""Multi-file artifacts made visible by a manifest written last.

``<prefix>/manifest.json`` holds the sha256 and size of every file plus metadata. A prefix
without a valid manifest does not exist for readers; a file whose sha256 differs from its
manifest is refused with an error naming it.

The manifest is *created*, never overwritten (:meth:`ObjectStore.create`): when two runs
write the same artifact at once, exactly one manifest wins. The loser checks that the
winner's files still match the winner's manifest; if its own data files replaced the winner's
with different bytes, it makes the artifact whole again as a rebuild does: it rewrites its
files, removes the manifest, and creates its own.

Small files (JSON) are given and read as ``bytes``; model-sized ones are given as tensors or
local files (:mod:`storage.staged`) and streamed to the store, and :func:`read_tensor_file`
streams one back (or, from a local store, reads it in place), checking its sha256 on the way.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from storage.digest import sha256_bytes
from storage.errors import ArtifactError, ArtifactMissing, StorageError
from storage.objectstore import ObjectStore
from storage.staged import ArtifactFile, LocalFile
from storage.tensors import load_tensor_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_TAKEOVER_ATTEMPTS = 3


@dataclass(frozen=True)
class ArtifactRef:
    """A reference to a finished artifact: where it is and what it contains."""

    uri: str
    prefix: str
    sha256: str  # digest of the manifest's file table: identifies the whole artifact
    meta: dict[str, Any] = field(default_factory=dict)


def write_artifact(
    store: ObjectStore,
    prefix: str,
    files: Mapping[str, ArtifactFile],
    meta: dict[str, Any],
    written: Mapping[str, dict[str, Any]] | None = None,
) -> ArtifactRef:
    """Write every file, then create the manifest; returns the artifact now at ``prefix``.

    That is this write's artifact, or an intact one another writer finished first. A
    ``TensorFile`` is saved to a local scratch file first; it and a ``LocalFile`` stream to the
    store, their sha256 computed on the way (:mod:`storage.staged`). ``written``: files other
    processes already put at ``prefix`` (:func:`write_artifact_file`), by name, with the
    manifest entries they got; the manifest lists them too.
    """
    existing = find_artifact(store, prefix)
    if existing is not None and verify_artifact(store, prefix) is None:
        return existing
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # Beside the artifact in a local store, so that a saved tensor file is linked, not copied.
    beside = store.local_path(prefix)
    if beside is not None:
        os.makedirs(beside, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", suffix=".partial", dir=beside) as scratch:
        staged = {
            name: _stage(store, f"{prefix}/{name}", data, Path(scratch) / f"{index}.safetensors")
            for index, (name, data) in enumerate(files.items())
        }
        for _ in range(_TAKEOVER_ATTEMPTS):
            table = {name: _write(store, f"{prefix}/{name}", data) for name, data in staged.items()}
            table |= dict(written or {})
            manifest = {
                "format_version": FORMAT_VERSION,
                "created": created,
                "files": table,
                "meta": meta,
            }
            encoded = json.dumps(manifest, indent=1, sort_keys=True).encode()
            if store.create(f"{prefix}/{MANIFEST}", encoded):
                return ArtifactRef(store.url(prefix), prefix, table_sha256(table), meta)
            winner = find_artifact(store, prefix)
            if winner is not None and verify_artifact(store, prefix) is None:
                return winner
            invalidate_artifact(store, prefix)  # a broken or mismatched manifest: take it over
    raise ArtifactError(
        f"{store.url(prefix)}: other writers kept replacing this artifact while it was "
        "written: rerun when they are done"
    )


def write_artifact_file(
    store: ObjectStore, prefix: str, name: str, data: ArtifactFile
) -> dict[str, Any]:
    """Put one file of an artifact that another process will commit (its manifest names it,
    see ``written`` in :func:`write_artifact`); returns the file's manifest entry."""
    beside = store.local_path(prefix)
    if beside is not None:
        os.makedirs(beside, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", suffix=".partial", dir=beside) as scratch:
        staged = _stage(store, f"{prefix}/{name}", data, Path(scratch) / "file.safetensors")
        return _write(store, f"{prefix}/{name}", staged)


def _stage(
    store: ObjectStore, key: str, data: ArtifactFile, path: Path
) -> bytes | LocalFile | Path:
    """``data`` as it is uploaded: bytes and local files as they are, tensors saved to ``path``
    (a ``Path``: a file of our own, which a local store may link instead of copying)."""
    if isinstance(data, bytes | LocalFile):
        return data
    try:
        data.save(path)
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        advice = "free space there" + (" or set TMPDIR" if store.local_path(key) is None else "")
        raise StorageError(
            f"{store.url(key)}: cannot save it to {path.parent} before it goes to the store "
            f"({reason}): {advice}"
        ) from None
    return path


def _write(store: ObjectStore, key: str, data: bytes | LocalFile | Path) -> dict[str, Any]:
    """Upload one staged file; its manifest entry (sha256 and size)."""
    if isinstance(data, bytes):
        store.put(key, data)
        return {"sha256": sha256_bytes(data), "size": len(data)}
    if isinstance(data, LocalFile):
        sha256, size = store.upload(key, data.path)
    else:
        sha256, size = store.upload(key, data, consume=True)
    return {"sha256": sha256, "size": size}


def find_artifact(store: ObjectStore, prefix: str) -> ArtifactRef | None:
    """The artifact at ``prefix`` if its manifest exists and parses, else None."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        return None
    return ArtifactRef(
        store.url(prefix), prefix, table_sha256(manifest["files"]), manifest.get("meta", {})
    )


def read_manifest(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    """The parsed manifest at ``prefix``, or None if it is absent or not a valid manifest."""
    try:
        manifest = json.loads(store.get(f"{prefix}/{MANIFEST}"))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify_artifact(store: ObjectStore, prefix: str) -> str | None:
    """None if every file matches the manifest, else what is wrong, naming the file."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        return f"{store.url(prefix)}: no valid manifest"
    for name, expected in manifest["files"].items():
        try:
            _check(store, f"{prefix}/{name}", expected, _download(store, f"{prefix}/{name}", None))
        except ArtifactError as error:
            return str(error)
    return None


def invalidate_artifact(store: ObjectStore, prefix: str) -> None:
    """Make the artifact invisible (its manifest goes first) so that it can be rewritten."""
    store.delete(f"{prefix}/{MANIFEST}")


def read_file(store: ObjectStore, prefix: str, name: str) -> bytes:
    """Read one small file of an artifact, verified against the manifest (tensor files:
    :func:`read_tensor_file`)."""
    expected = expected_entry(store, prefix, name)
    data = _read(store, f"{prefix}/{name}")
    _check(store, f"{prefix}/{name}", expected, (sha256_bytes(data), len(data)))
    return data


def read_tensor_file(store: ObjectStore, prefix: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file of an artifact, verified against the manifest.

    A local store's file is hashed in place and then memory-mapped; a remote one is streamed
    to a scratch file while hashing, then memory-mapped from there. Never held as bytes.
    """
    expected = expected_entry(store, prefix, name)
    key = f"{prefix}/{name}"
    local = store.local_path(key)
    if local is not None:
        _check(store, key, expected, _download(store, key, None))
        return load_tensor_file(local, store.url(prefix))
    with tempfile.TemporaryDirectory(prefix="mergeline-read-") as scratch:
        path = Path(scratch) / "file.safetensors"
        _check(store, key, expected, _download(store, key, path))
        return load_tensor_file(path, store.url(prefix))  # mapped: outlives the file's name


def expected_entry(store: ObjectStore, prefix: str, name: str) -> dict[str, Any]:
    """The manifest's entry (sha256, size) for file ``name``."""
    manifest_data = _read(store, f"{prefix}/{MANIFEST}")
    try:
        return json.loads(manifest_data)["files"][name]
    except (KeyError, ValueError, TypeError):
        raise ArtifactError(
            f"{store.url(prefix)}: the manifest does not list '{name}': rebuild the artifact"
        ) from None


def _check(store: ObjectStore, key: str, expected: dict[str, Any], found: tuple[str, int]) -> None:
    sha256, size = found
    if size != expected["size"] or sha256 != expected["sha256"]:
        raise ArtifactError(
            f"{store.url(key)}: checksum mismatch (sha256 differs from the "
            "manifest): the file is corrupt; delete the artifact directory to rebuild it"
        )


def verified_download(
    store: ObjectStore, key: str, expected: dict[str, Any], target: Path | None
) -> None:
    """Stream ``key`` to ``target`` (None: hash it in place), refusing it unless its sha256
    and size are ``expected``'s (a manifest entry)."""
    _check(store, key, expected, _download(store, key, target))


def _read(store: ObjectStore, key: str) -> bytes:
    try:
        return store.get(key)
    except FileNotFoundError:
        raise ArtifactMissing(store.url(key)) from None


def _download(store: ObjectStore, key: str, target: Path | None) -> tuple[str, int]:
    try:
        return store.download(key, target)
    except FileNotFoundError:
        raise ArtifactMissing(store.url(key)) from None


def table_sha256(table: dict[str, Any]) -> str:
    """The artifact's identity: the digest of its manifest's file table (names, sha256, sizes)."""
    return sha256_bytes(json.dumps(table, sort_keys=True).encode())

"""Artifact files as verified local paths, for readers that stream or memory-map them.

``storage.artifacts.read_file`` returns a file's bytes; a merge engine wants a path it can read
tensor by tensor instead. Local stores give the store's own path after a streamed sha256 check;
remote stores (s3://) are downloaded to a scratch directory while hashing.

An artifact's file names are the manifest's keys, and may hold folders (``transformers/…``):
:func:`copy_artifact` copies every listed file, never only the prefix's direct children.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from storage.artifacts import MANIFEST
from storage.errors import ArtifactError, ArtifactMissing
from storage.objectstore import FsspecStore
from storage.quoting import quoted


def read_manifest(store: FsspecStore, prefix: str) -> dict[str, Any]:
    """The manifest of the artifact at ``prefix``; a missing or bad one is an ArtifactError."""
    try:
        manifest = json.loads(store.get(f"{prefix}/{MANIFEST}"))
        manifest["files"]  # noqa: B018 - a manifest without a file table is no manifest
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        raise ArtifactError(
            f"{store.url(prefix)} has no valid manifest: it is not a finished artifact; check "
            "the URI, or rerun the pipeline that builds it"
        ) from None
    return manifest


def verified_path(store: FsspecStore, prefix: str, name: str, scratch: Path) -> Path:
    """A local path of artifact file ``name`` whose size and sha256 match the manifest."""
    expected = read_manifest(store, prefix)["files"].get(name)
    if expected is None:
        raise ArtifactError(f"{store.url(prefix)}: the manifest does not list '{name}'")
    local = store.local_path(f"{prefix}/{name}")
    if local is not None:
        _fetch(store, prefix, name, expected, None)
        return Path(local)
    path = scratch / prefix.replace("/", "_") / _relative(store, prefix, name)
    _fetch(store, prefix, name, expected, path)
    return path


def verified_paths(wanted: list[tuple[FsspecStore, str, str]], scratch: Path) -> list[Path]:
    """``verified_path`` for each (store, prefix, name), hashed concurrently, in order.

    hashlib and file reads release the GIL, so threads use every core for the checksums.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda item: verified_path(*item, scratch), wanted))


def copy_artifact(store: FsspecStore, prefix: str, target: Path, folder: str = "") -> Path:
    """Every file the manifest lists (only those under ``folder``, if given), verified, into
    the new directory ``target``, keeping sub-folders; returns ``target``.

    The files land in a staging directory renamed to ``target`` once all are there, so a
    directory at ``target`` is always complete. If another process made it first, that one
    stays. With no ``folder`` the manifest is copied too: the directory is the artifact.
    """
    manifest = read_manifest(store, prefix)
    inside = f"{folder.strip('/')}/" if folder else ""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    staging.mkdir(parents=True)
    try:
        for name, expected in manifest["files"].items():
            if name.startswith(inside):
                relative = _relative(store, prefix, name.removeprefix(inside))
                _fetch(store, prefix, name, expected, staging / relative)
        if not inside:
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_files(store: FsspecStore, prefix: str, sizes_only: bool = False) -> ArtifactError | None:
    """None if every file the manifest lists exists with its size and (unless ``sizes_only``)
    its sha256, else the error naming the first file that does not (:class:`ArtifactMissing`
    for a file that is gone). Streams: no file is held in memory."""
    for name, expected in read_manifest(store, prefix)["files"].items():
        try:
            if not sizes_only:
                _fetch(store, prefix, name, expected, None)
            elif store.size(f"{prefix}/{name}") != expected["size"]:
                return ArtifactError(
                    f"{store.url(prefix + '/' + name)}: size differs from the manifest: the file "
                    "is corrupt; delete the artifact directory to rebuild it"
                )
        except FileNotFoundError:
            return ArtifactMissing(store.url(prefix + "/" + name), "rebuild it")
        except ArtifactError as error:
            return error
    return None


def _relative(store: FsspecStore, prefix: str, name: str) -> Path:
    """A manifest file name as a relative path; one that could leave the directory is refused."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ArtifactError(
            f"{store.url(prefix)}: the manifest lists the file name {quoted(name)}, which is no "
            "relative path: the artifact is corrupt; delete it to rebuild it"
        )
    return Path(*path.parts)


def _fetch(
    store: FsspecStore, prefix: str, name: str, expected: dict[str, Any], copy: Path | None
) -> None:
    """Hash artifact file ``name`` while streaming it (into ``copy`` when given); a missing
    file or one whose size or sha256 differs from ``expected`` is an ArtifactError."""
    try:
        sha256, size = store.download(f"{prefix}/{name}", copy)
    except FileNotFoundError:
        raise ArtifactMissing(store.url(prefix + "/" + name), "rebuild it") from None
    if size != expected["size"] or sha256 != expected["sha256"]:
        if copy is not None:
            copy.unlink(missing_ok=True)
        raise ArtifactError(
            f"{store.url(prefix + '/' + name)}: checksum mismatch (sha256 differs from the "
            "manifest): the file is corrupt; delete the artifact directory to rebuild it"
        )

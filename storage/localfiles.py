"""Artifact files as verified local paths, for readers that stream or memory-map them.

``storage.artifacts.read_file`` returns a file's bytes; a merge engine wants a path it can read
tensor by tensor instead. Local stores give the store's own path after a streamed sha256 check;
remote stores (s3://) are downloaded to a scratch directory while hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from storage.artifacts import MANIFEST
from storage.errors import ArtifactError, ArtifactMissing
from storage.objectstore import FsspecStore

CHUNK = 16 * 1024 * 1024


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
    hasher, size = hashlib.sha256(), 0
    try:
        if local is not None:
            with open(local, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
            path = Path(local)
        else:
            path = scratch / prefix.replace("/", "_") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with (
                store.fs.open(f"{store.root}/{prefix}/{name}", "rb") as source,
                open(path, "wb") as target,
            ):
                while chunk := source.read(CHUNK):
                    hasher.update(chunk)
                    target.write(chunk)
                    size += len(chunk)
    except FileNotFoundError:
        raise ArtifactMissing(store.url(prefix + "/" + name), "rebuild it") from None
    if size != expected["size"] or hasher.hexdigest() != expected["sha256"]:
        raise ArtifactError(
            f"{store.url(prefix + '/' + name)}: checksum mismatch (sha256 differs from the "
            "manifest): the file is corrupt; delete the artifact directory to rebuild it"
        )
    return path


def verified_paths(wanted: list[tuple[FsspecStore, str, str]], scratch: Path) -> list[Path]:
    """``verified_path`` for each (store, prefix, name), hashed concurrently, in order.

    hashlib and file reads release the GIL, so threads use every core for the checksums.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda item: verified_path(*item, scratch), wanted))

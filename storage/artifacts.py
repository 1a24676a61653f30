"""Multi-file artifacts made visible by a manifest written last.

``<prefix>/manifest.json`` holds the sha256 and size of every file plus metadata. A prefix
without a valid manifest does not exist for readers; a file whose sha256 differs from its
manifest is refused with an error naming it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from storage.digest import sha256_bytes
from storage.errors import ArtifactError
from storage.objectstore import ObjectStore

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ArtifactRef:
    """A reference to a finished artifact: where it is and what it contains."""

    uri: str
    prefix: str
    sha256: str  # digest of the manifest's file table: identifies the whole artifact
    meta: dict[str, Any] = field(default_factory=dict)


def write_artifact(
    store: ObjectStore, prefix: str, files: dict[str, bytes], meta: dict[str, Any]
) -> ArtifactRef:
    """Write every file, then the manifest; returns the artifact's reference."""
    table = {}
    for name, data in files.items():
        store.put(f"{prefix}/{name}", data)
        table[name] = {"sha256": sha256_bytes(data), "size": len(data)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": table,
        "meta": meta,
    }
    store.put(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return ArtifactRef(store.url(prefix), prefix, _artifact_sha(table), meta)


def find_artifact(store: ObjectStore, prefix: str) -> ArtifactRef | None:
    """The artifact at ``prefix`` if its manifest exists and parses, else None."""
    try:
        manifest = json.loads(store.get(f"{prefix}/{MANIFEST}"))
        table = manifest["files"]
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None
    return ArtifactRef(store.url(prefix), prefix, _artifact_sha(table), manifest.get("meta", {}))


def read_file(store: ObjectStore, prefix: str, name: str) -> bytes:
    """Read one file of an artifact, verified against the manifest."""
    manifest_data = _read(store, f"{prefix}/{MANIFEST}")
    try:
        expected = json.loads(manifest_data)["files"][name]
    except (KeyError, ValueError, TypeError):
        raise ArtifactError(
            f"{store.url(prefix)}: the manifest does not list '{name}': rebuild the artifact"
        ) from None
    data = _read(store, f"{prefix}/{name}")
    if len(data) != expected["size"] or sha256_bytes(data) != expected["sha256"]:
        raise ArtifactError(
            f"{store.url(prefix + '/' + name)}: checksum mismatch (sha256 differs from the "
            "manifest): the file is corrupt; delete the artifact directory to rebuild it"
        )
    return data


def _read(store: ObjectStore, key: str) -> bytes:
    try:
        return store.get(key)
    except FileNotFoundError:
        raise ArtifactError(f"{store.url(key)} does not exist: rebuild the artifact") from None


def _artifact_sha(table: dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(table, sort_keys=True).encode())

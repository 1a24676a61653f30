"""Multi-file artifacts made visible by a manifest written last.

``<prefix>/manifest.json`` holds the sha256 and size of every file plus metadata. A prefix
without a valid manifest does not exist for readers; a file whose sha256 differs from its
manifest is refused with an error naming it.

The manifest is *created*, never overwritten (:meth:`ObjectStore.create`): when two runs
write the same artifact at once, exactly one manifest wins. The loser checks that the
winner's files still match the winner's manifest; if its own data files replaced the winner's
with different bytes, it makes the artifact whole again as a rebuild does: it rewrites its
files, removes the manifest, and creates its own.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from storage.digest import sha256_bytes
from storage.errors import ArtifactError, ArtifactMissing
from storage.objectstore import ObjectStore

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
    store: ObjectStore, prefix: str, files: dict[str, bytes], meta: dict[str, Any]
) -> ArtifactRef:
    """Write every file, then create the manifest; returns the artifact now at ``prefix``.

    That is this write's artifact, or an intact one another writer finished first.
    """
    existing = find_artifact(store, prefix)
    if existing is not None and verify_artifact(store, prefix) is None:
        return existing
    table = {}
    for name, data in files.items():
        table[name] = {"sha256": sha256_bytes(data), "size": len(data)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": table,
        "meta": meta,
    }
    encoded = json.dumps(manifest, indent=1, sort_keys=True).encode()
    for _ in range(_TAKEOVER_ATTEMPTS):
        for name, data in files.items():
            store.put(f"{prefix}/{name}", data)
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
    for name in manifest["files"]:
        try:
            read_file(store, prefix, name)
        except ArtifactError as error:
            return str(error)
    return None


def invalidate_artifact(store: ObjectStore, prefix: str) -> None:
    """Make the artifact invisible (its manifest goes first) so that it can be rewritten."""
    store.delete(f"{prefix}/{MANIFEST}")


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
        raise ArtifactMissing(store.url(key)) from None


def table_sha256(table: dict[str, Any]) -> str:
    """The artifact's identity: the digest of its manifest's file table (names, sha256, sizes)."""
    return sha256_bytes(json.dumps(table, sort_keys=True).encode())

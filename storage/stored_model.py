"""A published model logged in MLflow by reference: a pointer to its files in the store.

The MLflow model's artifact ``model`` holds ``stored_model.json`` (the store's URI and
endpoint, the model's prefix and the sha256 of its manifest) and ``config.json``, not the
weights: MLflow never copies them, and the driver that logs the model never reads them. When
the model is loaded, :func:`resolve_model_dir` gives the directory the serving code reads: the
store's own folder for a ``file://`` store, else a verified copy in the node cache
(``$MERGELINE_CACHE/models/<sha256>``), made once per node. S3 credentials come from the
environment, as for every other reader of the store.
"""

from __future__ import annotations

import json
from pathlib import Path

from storage.artifacts import find_artifact, read_file
from storage.errors import ArtifactMissing
from storage.localfiles import copy_artifact
from storage.nodecache import cache_root
from storage.objectstore import FsspecStore, open_store

POINTER = "stored_model.json"


def reference_files(
    store: FsspecStore, endpoint_url: str | None, prefix: str, sha256: str
) -> dict[str, bytes]:
    """The files an MLflow model logs for the stored model at ``prefix``: the pointer and the
    model's ``config.json`` (read from the store, checked against the manifest)."""
    pointer = {"store": store.uri, "endpoint_url": endpoint_url, "prefix": prefix, "sha256": sha256}
    return {
        POINTER: json.dumps(pointer, indent=1, sort_keys=True).encode(),
        "config.json": read_file(store, prefix, "config.json"),
    }


def resolve_model_dir(directory: Path) -> Path:
    """The local directory of the model ``directory`` stands for: ``directory`` itself when it
    holds the files (models logged with them), else the stored model its pointer names."""
    pointer = directory / POINTER
    if not pointer.is_file():
        return directory
    ref = json.loads(pointer.read_text())
    store = open_store(ref["store"], ref.get("endpoint_url"))
    found = find_artifact(store, ref["prefix"])
    if found is None or found.sha256 != ref["sha256"]:
        advice = "it was deleted or rewritten after it was registered: publish it again"
        raise ArtifactMissing(store.url(ref["prefix"]), advice)
    local = store.local_path(ref["prefix"])
    if local is not None:
        return Path(local)
    target = cache_root().parent / "models" / ref["sha256"]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_artifact(store, ref["prefix"], target)  # each file checked; renamed when complete
    return target

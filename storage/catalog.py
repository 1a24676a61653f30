"""What a store holds: its finished task vectors and merged models, read from their manifests.

Only prefixes with a valid manifest are listed: a directory without one does not exist.
"""

from __future__ import annotations

from typing import Any

from storage.artifacts import read_manifest, table_sha256
from storage.objectstore import ObjectStore
from storage.taskvectors import is_adapter, model_prefix, task_vector_prefix


def list_task_vectors(store: ObjectStore) -> list[dict[str, Any]]:
    """One row per finished task vector, oldest first.

    ``format`` is ``dense`` or ``lora``; a LoRA row also has the factors' bytes
    (``adapter_bytes``) and those of the dense task vector it stands for (``dense_bytes``),
    as its manifest records them (None in a dense row).
    """
    rows = []
    for key in store.list("task-vectors"):
        prefix = task_vector_prefix(key)
        manifest = read_manifest(store, prefix)
        if manifest is None:
            continue
        meta = manifest.get("meta", {})
        rows.append(
            {
                "task": meta.get("task"),
                "mode": meta.get("mode"),
                "base_digest": meta.get("base_digest"),
                "dataset_digest": meta.get("dataset_digest"),
                "format": "lora" if is_adapter(meta) else "dense",
                "adapter_bytes": meta.get("adapter_bytes") if is_adapter(meta) else None,
                "dense_bytes": meta.get("dense_bytes") if is_adapter(meta) else None,
                **_common(store, prefix, manifest),
            }
        )
    return sorted(rows, key=lambda row: (row["created"] or "", row["uri"]))


def list_merged_models(store: ObjectStore) -> list[dict[str, Any]]:
    """One row per finished merged model, oldest first."""
    rows = []
    for name in store.list("models"):
        for run_id in store.list(f"models/{name}"):
            prefix = model_prefix(name, run_id)
            manifest = read_manifest(store, prefix)
            if manifest is None:
                continue
            meta = manifest.get("meta", {})
            rows.append(
                {
                    "name": name,
                    "run_id": run_id,
                    "method": meta.get("candidate", {}).get("method"),
                    "tasks": sorted(meta.get("task_vectors", {})),
                    "base_digest": meta.get("base_digest"),
                    "test": meta.get("test", {}),
                    **_common(store, prefix, manifest),
                }
            )
    return sorted(rows, key=lambda row: (row["created"] or "", row["uri"]))


def _common(store: ObjectStore, prefix: str, manifest: dict[str, Any]) -> dict[str, Any]:
    files = manifest["files"]
    return {
        "size": sum(int(entry.get("size", 0)) for entry in files.values()),
        "created": manifest.get("created"),
        "uri": store.url(prefix),
        "sha256": table_sha256(files),
    }

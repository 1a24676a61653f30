"""``mergeline ls``: the task vectors and merged models in a store, as tables or JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from storage.catalog import list_merged_models, list_task_vectors
from storage.objectstore import ObjectStore


def list_store(store: ObjectStore) -> dict[str, Any]:
    return {
        "store": store.uri,
        "task_vectors": list_task_vectors(store),
        "models": list_merged_models(store),
    }


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _vector_size(row: dict[str, Any]) -> str:
    """An adapter's size and the dense size it stands for; a dense task vector's as before."""
    size = _size(row["size"])
    if row.get("format") != "lora":
        return size
    dense = row.get("dense_bytes")
    return f"{size} (adapter of {_size(dense)} dense)" if dense else f"{size} (adapter)"


def _short(digest: str | None) -> str:
    return (digest or "-")[:12]


def print_listing(listing: dict[str, Any], console: Console) -> None:
    vectors = Table(title=f"task vectors in {listing['store']}")
    for column in ("task", "mode", "base digest", "dataset digest", "size", "created", "sha256"):
        vectors.add_column(column, justify="right" if column == "size" else "left")
    for row in listing["task_vectors"]:
        vectors.add_row(
            str(row["task"]),
            str(row["mode"]),
            _short(row["base_digest"]),
            _short(row["dataset_digest"]),
            _vector_size(row),
            str(row["created"]),
            _short(row["sha256"]),
        )
    console.print(vectors)
    models = Table(title=f"merged models in {listing['store']}")
    for column in ("name", "run", "method", "tasks", "base digest", "size", "created"):
        models.add_column(column, justify="right" if column == "size" else "left")
    for row in listing["models"]:
        models.add_row(
            row["name"],
            row["run_id"],
            str(row["method"] or "-"),
            ", ".join(row["tasks"]),
            _short(row["base_digest"]),
            _size(row["size"]),
            str(row["created"]),
        )
    console.print(models)

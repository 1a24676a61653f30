"""Why a task was fine-tuned again instead of reused: the nightly run's ``rebuilt_reason``.

A task vector's cache key digests the base model, the task's data and the fine-tune config,
so a cache miss means one of them changed since the task's previous vector, or that vector is
gone. The previous vector is the one the pipeline's last run used (its summary under
``runs/``), else the newest stored vector of a task with the same name.
"""

from __future__ import annotations

from typing import Any

from pipelines.spec.plan import finetune_config_for_key
from storage.artifacts import read_manifest
from storage.catalog import list_task_vectors
from storage.objectstore import ObjectStore
from storage.runs import latest_summary
from storage.taskvectors import task_vector_prefix

NEW_DATA = "new data digest"
NEW_CONFIG = "new fine-tune config"
NEW_BASE = "new base model"
FIRST_RUN = "first run"
MISSING = "cached task vector missing or corrupt"


def rebuilt_reasons(
    store: ObjectStore, pipeline: str, tasks: dict[str, dict[str, Any]]
) -> dict[str, str | None]:
    """task -> None for a cache hit, else why it was fine-tuned (see :func:`explain_rebuild`).

    ``tasks`` maps a task name to {"key", "cache_hit", "meta"} as the fine-tune stage returns
    it, ``meta`` being the new task vector's manifest meta. Call it before this run's summary
    is written, so that "the previous run" is an earlier one.
    """
    rebuilt = [name for name, info in tasks.items() if not info["cache_hit"]]
    reasons: dict[str, str | None] = {name: None for name in tasks}
    if not rebuilt:
        return reasons
    previous_run = latest_summary(store, pipeline)
    catalog: list[dict[str, Any]] | None = None
    for name in rebuilt:
        key = tasks[name]["key"]
        previous_key = _key_used_by(previous_run, name)
        previous = _meta(store, previous_key) if previous_key else None
        if previous is None:  # not in the last run, or its vector was deleted since
            catalog = list_task_vectors(store) if catalog is None else catalog
            previous_key = _newest_key(catalog, name, key)
            previous = _meta(store, previous_key) if previous_key else None
        if previous_key == key:  # same inputs as last time: the stored vector was gone
            reasons[name] = MISSING
        else:
            reasons[name] = explain_rebuild(tasks[name]["meta"], previous)
    return reasons


def explain_rebuild(current: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """What differs between two task vectors' manifest metas ("first run" without one)."""
    if previous is None:
        return FIRST_RUN
    changes = []
    if previous.get("dataset_digest") != current.get("dataset_digest"):
        changes.append(NEW_DATA)
    config = [finetune_config_for_key(m.get("finetune") or {}) for m in (previous, current)]
    if config[0] != config[1]:  # execution-only settings (resources, ...) do not count
        changes.append(NEW_CONFIG)
    if previous.get("base_digest") != current.get("base_digest"):
        changes.append(NEW_BASE)
    return ", ".join(changes) or MISSING


def _key_used_by(summary: dict[str, Any] | None, task: str) -> str | None:
    """The key of the task vector ``summary``'s run used for ``task``."""
    entry = (summary or {}).get("tasks", {}).get(task)
    if not isinstance(entry, dict) or not entry.get("task_vector_uri"):
        return None
    return _key_of(str(entry["task_vector_uri"]))


def _newest_key(catalog: list[dict[str, Any]], task: str, current_key: str) -> str | None:
    """The newest stored vector of a task named ``task``, other than this run's own."""
    for row in reversed(catalog):  # the catalog is oldest first
        if row["task"] == task and _key_of(row["uri"]) != current_key:
            return _key_of(row["uri"])
    return None


def _key_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _meta(store: ObjectStore, key: str) -> dict[str, Any] | None:
    manifest = read_manifest(store, task_vector_prefix(key))
    if manifest is None:
        return None
    return manifest.get("meta", {})

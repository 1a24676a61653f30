"""Why a task was rebuilt: against the last run of its pipeline, else its newest vector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.run.incremental import rebuilt_reasons
from storage.artifacts import invalidate_artifact
from storage.objectstore import FsspecStore, open_store
from storage.taskvectors import (
    find_task_vector,
    task_vector_prefix,
    write_summary,
    write_task_vector,
)

CONFIG = {"mode": "standard", "steps": 30, "lr": 0.001}


@pytest.fixture
def store(tmp_path: Path) -> FsspecStore:
    return open_store(f"file://{tmp_path}/store")


def vector(store: FsspecStore, key: str, task: str, data="d1", base="b1", config=None) -> dict:
    """Store a task vector with the given inputs; returns the stage's view of it."""
    meta = {
        "task": task,
        "dataset_digest": data,
        "base_digest": base,
        "finetune": config or CONFIG,
    }
    state = {"w": torch.zeros(2)}
    ref = write_task_vector(store, key, state, state, meta)
    return {"key": key, "cache_hit": False, "ref": ref, "meta": ref.meta}


def summary(store: FsspecStore, run_id: str, name: str, tasks: dict[str, dict]) -> None:
    entries = {t: {"task_vector_uri": i["ref"].uri, "cache_hit": False} for t, i in tasks.items()}
    write_summary(store, run_id, {"run_id": run_id, "spec": {"name": name}, "tasks": entries})


def test_a_task_never_seen_is_a_first_run(store: FsspecStore) -> None:
    tasks = {"a": vector(store, "k1", "a")}
    assert rebuilt_reasons(store, "nightly", tasks) == {"a": "first run"}


def test_a_cache_hit_has_no_reason(store: FsspecStore) -> None:
    hit = vector(store, "k1", "a") | {"cache_hit": True}
    assert rebuilt_reasons(store, "nightly", {"a": hit}) == {"a": None}


def test_each_changed_input_is_named(store: FsspecStore) -> None:
    before = {
        "data": vector(store, "old-data", "data"),
        "config": vector(store, "old-config", "config"),
        "base": vector(store, "old-base", "base"),
        "both": vector(store, "old-both", "both"),
    }
    summary(store, "20250101-020000-aaaaaa", "nightly", before)
    now = {
        "data": vector(store, "new-data", "data", data="d2"),
        "config": vector(store, "new-config", "config", config=CONFIG | {"lr": 0.01}),
        "base": vector(store, "new-base", "base", base="b2"),
        "both": vector(store, "new-both", "both", data="d2", base="b2"),
    }
    assert rebuilt_reasons(store, "nightly", now) == {
        "data": "new data digest",
        "config": "new fine-tune config",
        "base": "new base model",
        "both": "new data digest, new base model",
    }


def test_execution_only_settings_are_not_a_new_config(store: FsspecStore) -> None:
    summary(store, "20250101-020000-aaaaaa", "nightly", {"a": vector(store, "k1", "a")})
    execution = CONFIG | {"resources": {"num_cpus": 4}, "checkpoint_every": 50}
    now = vector(store, "k2", "a", data="d2", config=execution)
    assert rebuilt_reasons(store, "nightly", {"a": now}) == {"a": "new data digest"}


def test_the_last_run_of_the_pipeline_wins_over_newer_vectors(store: FsspecStore) -> None:
    used = vector(store, "used", "a", data="d1")
    summary(store, "20250101-020000-aaaaaa", "nightly", {"a": used})
    summary(store, "20250102-020000-bbbbbb", "other-pipeline", {"a": vector(store, "x", "a")})
    vector(store, "experiment", "a", data="d1", config=CONFIG | {"steps": 5})  # a later try
    now = vector(store, "now", "a", data="d2")
    assert rebuilt_reasons(store, "nightly", {"a": now}) == {"a": "new data digest"}


def test_without_a_previous_run_the_newest_same_named_vector_is_compared(
    store: FsspecStore,
) -> None:
    vector(store, "older", "a", data="d1")
    vector(store, "other-task", "b", data="d9")
    now = vector(store, "now", "a", data="d1", base="b2")
    assert rebuilt_reasons(store, "nightly", {"a": now}) == {"a": "new base model"}


def test_a_deleted_previous_vector_falls_back_to_the_store(store: FsspecStore) -> None:
    used = vector(store, "used", "a", data="d1")
    summary(store, "20250101-020000-aaaaaa", "nightly", {"a": used})
    invalidate_artifact(store, task_vector_prefix("used"))
    assert find_task_vector(store, "used") is None
    vector(store, "kept", "a", data="d1", config=CONFIG | {"steps": 99})
    now = vector(store, "now", "a", data="d1")
    assert rebuilt_reasons(store, "nightly", {"a": now}) == {"a": "new fine-tune config"}


def test_same_inputs_as_last_run_means_the_vector_was_lost(store: FsspecStore) -> None:
    used = vector(store, "same", "a")
    summary(store, "20250101-020000-aaaaaa", "nightly", {"a": used})
    rebuilt = vector(store, "same", "a")  # rebuilt under the same key (it had been corrupt)
    reasons = rebuilt_reasons(store, "nightly", {"a": rebuilt})
    assert reasons == {"a": "cached task vector missing or corrupt"}

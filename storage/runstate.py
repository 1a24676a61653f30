"""Which run a rerun continues: ``resume/<run-key>.json`` and ``runs/<run-id>/state.json``.

A pipeline run is identified by a *run key*, a digest of what it computes from (the spec and
its inputs' digests). While a run with that key is unfinished, ``resume/<run-key>.json`` names
its run id, so running the same command again after a crash continues that run under the same
id (finished stages are cache hits, the registry is written once per run id). The pointer goes
away when the run succeeds; the next run with the same key is a new run.
``runs/<run-id>/state.json`` records the run's status and how often it was started.
"""

from __future__ import annotations

import json
import time
from typing import Any

from storage.objectstore import ObjectStore
from storage.runs import run_prefix

RESUME = "resume"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(store.get(key))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def unfinished_run(store: ObjectStore, run_key: str) -> str | None:
    """The id of the unfinished run with ``run_key``, if one crashed or is still going."""
    pointer = _read(store, f"{RESUME}/{run_key}.json")
    return pointer.get("run_id") if pointer else None


def begin_run(store: ObjectStore, run_key: str, new_id: str) -> tuple[str, int]:
    """(run id, start count): the unfinished run with ``run_key`` again, else ``new_id``."""
    pointer = f"{RESUME}/{run_key}.json"
    if store.create(pointer, json.dumps({"run_id": new_id, "created": _now()}).encode()):
        run_id = new_id
    else:
        run_id = unfinished_run(store, run_key) or new_id
    state = read_run_state(store, run_id) or {"run_id": run_id, "run_key": run_key, "starts": 0}
    state |= {"status": "running", "starts": int(state.get("starts", 0)) + 1, "updated": _now()}
    store.put(f"{run_prefix(run_id)}/state.json", json.dumps(state, indent=1).encode())
    return run_id, state["starts"]


def finish_run(store: ObjectStore, run_key: str, run_id: str) -> None:
    """Mark ``run_id`` succeeded; a later run with the same key starts afresh."""
    state = read_run_state(store, run_id) or {"run_id": run_id, "run_key": run_key}
    state |= {"status": "succeeded", "updated": _now()}
    store.put(f"{run_prefix(run_id)}/state.json", json.dumps(state, indent=1).encode())
    store.delete(f"{RESUME}/{run_key}.json")


def read_run_state(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    return _read(store, f"{run_prefix(run_id)}/state.json")

"""Past pipeline runs in the store: ``runs/<run-id>/summary.json`` and ``candidates.json``.

A run's ``candidates.json`` (every scored candidate) is written before its ``summary.json``;
the summary is written last, so a run directory without one is not a finished run. Run ids
start with their UTC start time, so their names sort oldest first.
"""

from __future__ import annotations

import json
import re
from typing import Any

from storage.errors import ArtifactError
from storage.objectstore import ObjectStore

RUNS = "runs"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def run_prefix(run_id: str) -> str:
    if not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ArtifactError(
            f"{run_id!r} is not a run id (like 20250101-020000-a1b2c3): list the runs with "
            "`mergeline runs --store URI`"
        )
    return f"{RUNS}/{run_id}"


def write_candidates(
    store: ObjectStore, run_id: str, objective: str, best_id: str, rows: list[dict[str, Any]]
) -> str:
    """Store the search's rows (id, method, params, coefficient, accuracy, objective)."""
    key = f"{run_prefix(run_id)}/candidates.json"
    document = {"objective": objective, "best_id": best_id, "rows": rows}
    store.put(key, json.dumps(document, sort_keys=False).encode())
    return store.url(key)


def list_run_ids(store: ObjectStore) -> list[str]:
    """Ids of the runs under ``runs/``, oldest first (finished or not)."""
    return sorted(store.list(RUNS))


def read_summary(store: ObjectStore, run_id: str) -> dict[str, Any]:
    """The summary of run ``run_id``; an :class:`ArtifactError` if there is none."""
    return _read_json(store, f"{run_prefix(run_id)}/summary.json", run_id, "summary")


def read_candidates(store: ObjectStore, run_id: str) -> dict[str, Any]:
    """``{"objective", "best_id", "rows"}`` of run ``run_id``."""
    return _read_json(store, f"{run_prefix(run_id)}/candidates.json", run_id, "candidate list")


def list_summaries(store: ObjectStore, name: str | None = None) -> list[dict[str, Any]]:
    """Summaries of the finished runs, oldest first; only pipeline ``name``'s when given.

    Runs written before summaries named their pipeline (no ``spec`` key) match no name.
    """
    summaries = []
    for run_id in list_run_ids(store):
        summary = _try_summary(store, run_id)
        if summary is not None and (name is None or pipeline_name(summary) == name):
            summaries.append(summary)
    return summaries


def latest_summary(
    store: ObjectStore, name: str, before: str | None = None
) -> dict[str, Any] | None:
    """The newest finished run of pipeline ``name`` (older than run id ``before``, if given)."""
    for run_id in reversed(list_run_ids(store)):
        if before is not None and run_id >= before:
            continue
        summary = _try_summary(store, run_id)
        if summary is not None and pipeline_name(summary) == name:
            return summary
    return None


def pipeline_name(summary: dict[str, Any]) -> str | None:
    spec = summary.get("spec")
    return spec.get("name") if isinstance(spec, dict) else None


def _try_summary(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    try:
        summary = read_summary(store, run_id)
    except ArtifactError:
        return None
    return summary if isinstance(summary.get("tasks"), dict) else None


def _read_json(store: ObjectStore, key: str, run_id: str, what: str) -> dict[str, Any]:
    try:
        document = json.loads(store.get(key))
    except FileNotFoundError:
        raise ArtifactError(
            f"{store.url(key)} does not exist: run '{run_id}' has no {what} in this store "
            "(list the runs with `mergeline runs --store URI`)"
        ) from None
    except ValueError:
        raise ArtifactError(f"{store.url(key)} is not valid JSON: the {what} is corrupt") from None
    if not isinstance(document, dict):
        raise ArtifactError(f"{store.url(key)} is not a JSON object: the {what} is corrupt")
    return document


def write_scores(store: ObjectStore, run_id: str, scores: dict[str, Any]) -> str:
    """Store the run's validation and test scores by score key (:mod:`pipelines.search.scorebook`):
    a later run whose inputs did not change reads them instead of scoring again."""
    key = f"{run_prefix(run_id)}/scores.json"
    document = {"format_version": 1, "scores": scores}
    store.put(key, json.dumps(document, sort_keys=True).encode())
    return store.url(key)


def read_scores(store: ObjectStore, run_id: str) -> dict[str, Any]:
    """The scores run ``run_id`` stored; empty if it stored none or they are unreadable (they
    are a cache: a missing or corrupt file costs a rescoring, never a wrong score)."""
    try:
        document = json.loads(store.get(f"{run_prefix(run_id)}/scores.json"))
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("format_version") != 1:
        return {}
    scores = document.get("scores")
    return scores if isinstance(scores, dict) else {}

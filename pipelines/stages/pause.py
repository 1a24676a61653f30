"""A test-only pause point, so that a fault test decides *where* a fine-tune stops, not *when*.

Inert unless the environment variable ``MERGELINE_PAUSE_DIR`` names a folder that holds
``pause-at.json``, e.g. ``{"id": "...", "step": 100, "task": "*", "nth": 2, "store": "..."}``.

Every fine-tune that has just stored the checkpoint of ``step`` (for ``task``, or any task with
``"*"``; in ``store`` if given) takes a ticket: the files ``arrival-1``, ``arrival-2``, ... are
created exclusively, so concurrent workers get distinct numbers. The ``nth`` arrival (1 by
default) writes ``paused.json`` (its pid, task and step) and waits there for as long as that
request (its ``id``) stays in place; every other arrival goes on. A test can therefore kill
a worker, its driver or anything else while the fine-tune is known to sit right after a given
checkpoint, and a retried fine-tune (a later arrival) never stops again.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

ENVIRONMENT_VARIABLE = "MERGELINE_PAUSE_DIR"
POLL_S = 0.05


def pause_point(task: str, step: int, store_uri: str) -> None:
    """Wait here if the test's ``pause-at.json`` asks for this task, step and store."""
    folder = os.environ.get(ENVIRONMENT_VARIABLE)
    if not folder:
        return
    root = Path(folder)
    request = _request(root)
    if request is None:
        return
    if request["step"] != step or request.get("task", "*") not in ("*", task):
        return
    if request.get("store", store_uri) != store_uri:
        return
    if _take_ticket(root) != int(request.get("nth", 1)):
        return
    _publish(root / "paused.json", {"pid": os.getpid(), "task": task, "step": step})
    while (_request(root) or {}).get("id") == request["id"]:
        time.sleep(POLL_S)


def _request(root: Path) -> dict | None:
    try:
        return json.loads((root / "pause-at.json").read_text())
    except FileNotFoundError:
        return None


def _take_ticket(root: Path) -> int:
    number = 1
    while True:
        try:
            os.close(os.open(root / f"arrival-{number}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return number
        except FileExistsError:
            number += 1


def _publish(path: Path, document: dict) -> None:
    """Write ``path`` whole or not at all (a test reads it the moment it exists)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
        json.dump(document, handle)
    os.replace(handle.name, path)

"""Deterministic fault injection: hold a fine-tune right after a checkpoint, then kill.

The fine-tune side is :mod:`pipelines.stages.pause` (inert unless ``MERGELINE_PAUSE_DIR`` is
set). A test arms a :class:`Pause` in a folder that the processes it starts see through that
variable, waits until a worker sits at the pause, and kills what it means to kill. Nothing
depends on how fast the machine is: the worker cannot move past the pause on its own.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from pipelines.stages.pause import ENVIRONMENT_VARIABLE

#: How long a test waits for a worker to reach the pause before it fails (a bound, not a pace).
REACH_TIMEOUT_S = 600.0


class Pause:
    """One pause folder: arm it, wait for the worker that reached it, release it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def environment(self) -> dict[str, str]:
        """The variable the processes of a run need to see this pause."""
        return {ENVIRONMENT_VARIABLE: str(self.folder)}

    def arm(self, step: int, task: str = "*", nth: int = 1, store: str | None = None) -> None:
        """Hold the ``nth`` fine-tune (of ``task``, ``*`` for any) after checkpoint ``step``."""
        self.release()
        request: dict[str, Any] = {"id": uuid.uuid4().hex, "step": step, "task": task, "nth": nth}
        if store is not None:
            request["store"] = store
        staged = self.folder / "pause-at.json.new"
        staged.write_text(json.dumps(request))
        staged.replace(self.folder / "pause-at.json")

    def wait_until_reached(
        self, alive: Callable[[], bool] = lambda: True, timeout: float = REACH_TIMEOUT_S
    ) -> dict[str, Any]:
        """``{"pid", "task", "step"}`` of the paused worker, once it sits at the pause.

        Fails at once if ``alive()`` turns false (the run ended without reaching it).
        """
        paused = self.folder / "paused.json"
        deadline = time.monotonic() + timeout
        while not paused.exists():
            if not alive():
                raise AssertionError("the run ended before a fine-tune reached the pause")
            if time.monotonic() > deadline:
                raise AssertionError(f"no fine-tune reached the pause in {timeout:.0f}s")
            time.sleep(0.05)
        return json.loads(paused.read_text())

    def release(self) -> None:
        """Withdraw the request: a worker held by it goes on; the next arm starts afresh."""
        for path in self.folder.iterdir():
            path.unlink()


def kill_and_wait(processes: Iterable[psutil.Process], timeout: float = 60.0) -> None:
    """SIGKILL ``processes`` and return once every one of them is gone."""
    processes = list(processes)
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"still running after SIGKILL: {[p.pid for p in alive]}"


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (those that exist now)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_until_gone(pids: Iterable[int], timeout: float = 60.0) -> None:
    """Return as soon as none of ``pids`` exists; fail after ``timeout``."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"still running: {[(p.pid, p.name()) for p in alive]}"

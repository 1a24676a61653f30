"""What every driver-side stage of one run shares: its id, the store, the tracker, the console."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from storage.objectstore import FsspecStore
from storage.tracking_guard import GuardedTracker


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class RunContext:
    """One run's services, handed to each driver-side stage instead of six positionals."""

    run_id: str
    store: FsspecStore
    store_cfg: dict[str, Any]  # how Ray tasks open the same store (``open_store_from``)
    console: Console
    tracker: GuardedTracker | None = None  # None: a command that records nothing (diagnose)
    version: str = ""  # the code version every artifact and score of the run records
    ready: Callable[[], None] = _nothing  # starts Ray (lazily) before a stage submits work

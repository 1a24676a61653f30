"""Tracking failures follow ``tracking.on_error``: stop the run, or warn once and go on untracked.

``fail`` (the default): an unreachable server stops the run at :meth:`check`, before any
fine-tuning; a failure later in the run is a system failure of the stage ``tracking`` (exit
1; rerunning resumes from the cached artifacts). ``warn``: the first failure prints one
warning and turns tracking off for the rest of the run; the model is still written to the
store but not registered.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal

import requests
from mlflow.exceptions import MlflowException

from storage.errors import ServiceError, SystemFailure
from storage.tracking import MlflowTracker, redact_uri

_TRACKING_ERRORS: tuple[type[BaseException], ...] = (
    MlflowException,
    requests.RequestException,
    OSError,
)
try:
    from sqlalchemy.exc import SQLAlchemyError

    _TRACKING_ERRORS += (SQLAlchemyError,)
except ImportError:  # pragma: no cover - mlflow brings sqlalchemy
    pass


class GuardedTracker:
    """An :class:`MlflowTracker` whose failures follow ``on_error``; same methods."""

    def __init__(
        self,
        tracker: MlflowTracker,
        on_error: Literal["fail", "warn"],
        warn: Callable[[str], None],
    ) -> None:
        self.tracker, self.on_error, self._warn = tracker, on_error, warn
        self.disabled: str | None = None  # why tracking is off, None while it is on

    @property
    def enabled(self) -> bool:
        return self.disabled is None

    def check(self) -> None:
        """Fail (``fail``) or warn and turn tracking off (``warn``) if the store is unusable."""
        try:
            self.tracker.check()
        except ServiceError as error:
            if self.on_error == "fail":
                raise
            self._disable(str(error))

    def _disable(self, reason: str) -> None:
        if self.disabled is None:
            self.disabled = reason
            self._warn(
                f"tracking is off for this run (tracking.on_error: warn): {reason}; "
                "the model is written to the store but not registered"
            )

    def _call(
        self,
        what: str,
        function: Callable[..., Any],
        *args: Any,
        force: bool = False,
        **kwargs: Any,
    ) -> Any:
        if self.disabled is not None and not force:
            return None
        try:
            return function(*args, **kwargs)
        except _TRACKING_ERRORS as error:
            first = (str(error).strip().splitlines() or [""])[0][:300]
            first = re.sub(r"//[^/@\s]+@", "//", first)  # no user:password@ from any URL
            reason = (
                f"MLflow ({redact_uri(self.tracker.uri)}) failed to {what}: "
                f"{type(error).__name__}: {first}"
            )
            if self.on_error == "fail":
                raise SystemFailure("tracking", reason) from None
            self._disable(reason)
            return None

    @contextmanager
    def pipeline_run(self, run_id: str, tags: dict[str, str]) -> Iterator[str | None]:
        """The parent run, or None when tracking is off."""
        started = self._call("start the run", _enter, self.tracker.pipeline_run(run_id, tags))
        if started is None:
            yield None
            return
        manager, mlflow_id = started
        try:
            yield mlflow_id
        except BaseException as error:
            with suppress(Exception):  # the error that ended the run is the one to report
                manager.__exit__(type(error), error, None)
            raise
        self._call("end the run", manager.__exit__, None, None, None, force=True)

    def __getattr__(self, name: str) -> Any:
        """Every other :class:`MlflowTracker` method, guarded: a failure follows ``on_error``
        and, once tracking is off, the call returns None without reaching MLflow."""
        if name.startswith("_") or name == "tracker":
            raise AttributeError(name)
        method = getattr(self.tracker, name)
        if not callable(method):
            return method
        return functools.partial(self._call, name.replace("_", " "), method)


def _enter(manager: Any) -> tuple[Any, Any]:
    return manager, manager.__enter__()

"""tracking.on_error: fail stops the run before any work, warn carries on untracked."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.errors import ServiceError, SystemFailure
from storage.tracking import MlflowTracker
from storage.tracking_guard import GuardedTracker


def test_fail_raises_when_the_server_is_unreachable(unused_port: int) -> None:
    tracker = GuardedTracker(MlflowTracker(f"http://127.0.0.1:{unused_port}", "x"), "fail", print)
    with pytest.raises(ServiceError, match=f"127.0.0.1:{unused_port}"):
        tracker.check()


def test_warn_turns_tracking_off_once_and_every_call_becomes_a_no_op(unused_port: int) -> None:
    warnings: list[str] = []
    uri = f"http://user:hunter2@127.0.0.1:{unused_port}"
    tracker = GuardedTracker(MlflowTracker(uri, "x"), "warn", warnings.append)
    tracker.check()
    assert not tracker.enabled and len(warnings) == 1
    assert "not registered" in warnings[0] and "hunter2" not in warnings[0]
    with tracker.pipeline_run("run-1", {}) as parent:
        assert parent is None
        assert tracker.log_search([{"objective": 1.0}], "objective", {}) is None
        assert tracker.get_alias_version("model", "champion") is None
        assert tracker.publish("dir", "code.py", "model", {}, ["candidate"], {}) is None
    assert len(warnings) == 1


def test_a_failure_during_the_run_follows_on_error(tmp_path: Path) -> None:
    """The store breaks after the check: its database file is overwritten with garbage."""
    for on_error in ("fail", "warn"):
        database = tmp_path / on_error / "mlflow.db"
        warnings: list[str] = []
        tracker = GuardedTracker(
            MlflowTracker(f"sqlite:///{database}", "x"), on_error, warnings.append
        )
        tracker.check()
        assert tracker.enabled
        database.write_bytes(b"not a database any more" * 100)
        if on_error == "fail":
            with pytest.raises(SystemFailure, match="stage 'tracking' failed"):
                tracker.get_alias_version("model", "champion")
        else:
            assert tracker.get_alias_version("model", "champion") is None
            assert not tracker.enabled and "get alias version" in warnings[0]

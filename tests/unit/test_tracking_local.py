"""MlflowTracker against a SQLite file: the whole lineage flow, with no server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from storage.errors import ServiceError
from storage.tracking import MlflowTracker, redact_uri

if TYPE_CHECKING:
    from tests.conftest_mlflow import LineageFlow

pytest_plugins = ["tests.conftest_mlflow"]


@pytest.fixture
def tracker(tmp_path: Path) -> MlflowTracker:
    return MlflowTracker(f"sqlite:///{tmp_path}/tracking/mlflow.db", "mergeline-unit")


def test_full_lineage_on_sqlite(
    tracker: MlflowTracker, lineage_flow: LineageFlow, tmp_path: Path
) -> None:
    made = lineage_flow.record(tracker)

    lineage_flow.check(tracker.uri, made)
    assert (tmp_path / "tracking" / "mlartifacts").is_dir()
    np.testing.assert_allclose(lineage_flow.predict(tracker.uri, "candidate"), [3.0, 5.0])


def test_aliases_move_and_missing_alias_is_none(
    tracker: MlflowTracker, lineage_flow: LineageFlow
) -> None:
    assert tracker.get_alias_version("mergeline-test", "champion") is None
    lineage_flow.record(tracker)
    assert tracker.get_alias_version("mergeline-test", "champion") is None

    second = lineage_flow.record(tracker)["published"]
    assert second.version == 2
    tracker.set_alias("mergeline-test", "champion", 1)
    champion = tracker.get_alias_version("mergeline-test", "champion")
    assert champion is not None
    assert (champion["version"], champion["model_uri"]) == (1, "models:/mergeline-test/1")
    assert champion["tags"]["mergeline.dataset.sst2"] == "a" * 64
    tracker.set_alias("mergeline-test", "champion", 2)
    assert tracker.get_alias_version("mergeline-test", "champion")["version"] == 2
    assert tracker.get_alias_version("mergeline-test", "candidate")["version"] == 2


def test_exception_marks_parent_failed_and_propagates(tracker: MlflowTracker) -> None:
    with pytest.raises(KeyError), tracker.pipeline_run("run-broken", {}) as parent:
        raise KeyError("stage blew up")
    run = MlflowClient(tracking_uri=tracker.uri).get_run(parent)
    assert run.info.status == "FAILED"


def test_child_run_outside_pipeline_run_is_refused(tracker: MlflowTracker) -> None:
    with pytest.raises(RuntimeError, match="pipeline_run"):
        tracker.log_search([{"objective": 1.0}], "objective", {"objective": 1.0})


def test_search_rows_without_objective_are_refused(tracker: MlflowTracker) -> None:
    with tracker.pipeline_run("run-0002", {}), pytest.raises(ValueError, match="accuracy"):
        tracker.log_search([{"objective": 1.0}], "accuracy", {})


def test_unusable_sqlite_store_raises_service_error(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_text("not a database")
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "mergeline-unit")
    with pytest.raises(ServiceError, match="mlflow.db"):
        tracker.check()


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://user:pw@mlflow.local:5000/x", "http://mlflow.local:5000/x"),
        ("s3://key:secret@bucket/path", "s3://bucket/path"),
        ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
    ],
)
def test_redact_uri_strips_credentials(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown

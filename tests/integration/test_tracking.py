"""MlflowTracker against a real ``mlflow server`` process on 127.0.0.1."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from storage.errors import ServiceError
from storage.tracking import MlflowTracker

if TYPE_CHECKING:
    from tests.conftest_mlflow import LineageFlow

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.conftest_mlflow"]


def test_full_lineage_on_a_tracking_server(mlflow_server: str, lineage_flow: LineageFlow) -> None:
    tracker = MlflowTracker(mlflow_server, "mergeline-integration")
    tracker.check()

    made = lineage_flow.record(tracker)

    lineage_flow.check(mlflow_server, made)
    published = made["published"]
    assert published.aliases == ["candidate"]
    candidate = tracker.get_alias_version(published.registered_model, "candidate")
    assert candidate is not None and candidate["version"] == published.version
    assert tracker.get_alias_version(published.registered_model, "champion") is None
    np.testing.assert_allclose(lineage_flow.predict(mlflow_server, "candidate"), [3.0, 5.0])


def test_unreachable_server_fails_fast_with_service_error(unused_port: int) -> None:
    tracker = MlflowTracker(f"http://user:hunter2@127.0.0.1:{unused_port}", "mergeline-it")
    started = time.monotonic()
    with pytest.raises(ServiceError, match="127.0.0.1") as raised:
        with tracker.pipeline_run("run-unreachable", {}):
            pytest.fail("a run must not start without a tracking server")
    assert time.monotonic() - started < 10
    assert "hunter2" not in str(raised.value)


def test_credentials_in_the_uri_never_reach_the_output(
    mlflow_server: str, capfd: pytest.CaptureFixture[str]
) -> None:
    uri = mlflow_server.replace("http://", "http://user:hunter2@")
    tracker = MlflowTracker(uri, "mergeline-integration")
    with tracker.pipeline_run("run-credentials", {"mergeline.store": f"{uri}/store"}) as parent:
        tracker.log_search([{"objective": 1.0}], "objective", {"objective": 1.0})

    captured = capfd.readouterr()
    assert "hunter2" not in captured.out + captured.err
    tags = MlflowClient(tracking_uri=mlflow_server).get_run(parent).data.tags
    assert tags["mergeline.store"] == f"{mlflow_server}/store"

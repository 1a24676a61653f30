"""MLflow fixtures: a real ``mlflow server`` on 127.0.0.1 and a tiny publishable model.

Plain pytest fixtures, loaded as a plugin: ``pytest_plugins = ["tests.conftest_mlflow"]``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from storage.tracking import DatasetInfo, MlflowTracker

SERVER_START_TIMEOUT_S = 90.0
#: server URI -> its directory (``mlflow.db``, ``artifacts/``), for tests that inspect the bytes
SERVER_ROOTS: dict[str, Path] = {}

# Loaded by MLflow ("models from code"): the class is read from this file, never unpickled.
PYFUNC_CODE = textwrap.dedent(
    """
    import mlflow
    import numpy as np
    from safetensors.torch import load_file


    class TinyLinear(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            weights = load_file(f"{context.artifacts['model']}/model.safetensors")
            self.weight = weights["weight"].numpy()

        def predict(self, context, model_input, params=None):
            return np.asarray(model_input, dtype=np.float32) @ self.weight


    mlflow.models.set_model(TinyLinear())
    """
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and the workers it forked (its own process group)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _start_server(root: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """Start ``mlflow server`` on a free port and wait until it is healthy; None if it exited
    early because another process took the port between our probe and its bind."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    # The server's job runner (GenAI jobs mergeline never submits) would fork a Huey consumer
    # per job queue, each importing mlflow and polling the database for the whole session.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            if "address already in use" in log_path.read_text(errors="replace").lower():
                return None
            pytest.fail(f"mlflow server exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{uri}/health", timeout=1).status_code == 200:
                return process, uri
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            _stop(process)
            pytest.fail(f"mlflow server not healthy in time:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend, proxied artifacts); yields its http URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    for _ in range(3):
        started = _start_server(root)
        if started is not None:
            break
    else:
        pytest.fail("mlflow server: every port tried was taken")
    process, uri = started
    SERVER_ROOTS[uri] = root
    try:
        yield uri
    finally:
        _stop(process)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A model directory: one 2x1 linear layer in safetensors (weight = [[1], [2]])."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"weight": torch.tensor([[1.0], [2.0]])}, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text('{"in_features": 2, "out_features": 1}')
    return model_dir


@pytest.fixture
def pyfunc_code_path(tmp_path: Path) -> Path:
    """The pyfunc model's code file for :func:`tiny_model_dir`."""
    path = tmp_path / "tiny_linear_model.py"
    path.write_text(PYFUNC_CODE)
    return path


DATASETS = {
    "sst2": DatasetInfo("sst2", "file:///data/sst2.jsonl", "a" * 64, 120),
    "mnli": DatasetInfo("mnli", "s3://user:secret@bucket/mnli.jsonl", "b" * 64, 90),
}
SEARCH_ROWS = [
    {"method": "ties", "params": {"density": 0.2}, "coefficients": {"sst2": 0.5}, "objective": 0.7},
    {"method": "ties", "params": {"density": 0.5}, "coefficients": {"sst2": 0.3}, "objective": 0.9},
    {"method": "task_arithmetic", "params": {}, "coefficients": {"sst2": 0.4}, "objective": 0.8},
]
REGISTERED_MODEL = "mergeline-test"


class LineageFlow:
    """A pipeline-shaped sequence of tracker calls, and checks of what it recorded."""

    def __init__(self, model_dir: Path, code_path: Path, scratch: Path) -> None:
        self.model_dir, self.code_path, self.scratch = model_dir, code_path, scratch

    def record(self, tracker: MlflowTracker) -> dict[str, Any]:
        """Log one run: two fine-tunes, a search, a publish (alias candidate), a summary."""
        made: dict[str, Any] = {"finetune": {}}
        with tracker.pipeline_run("run-0001", {"mergeline.spec_digest": "c" * 64}) as parent:
            made["parent"] = parent
            for task, dataset in DATASETS.items():
                made["finetune"][task] = tracker.log_finetune(
                    task,
                    params={"lr": 1e-3, "optimizer": {"name": "adamw", "betas": [0.9, 0.99]}},
                    metrics={"val_accuracy": 0.8},
                    dataset=dataset,
                    tags={
                        "mergeline.task_vector_uri": f"file:///store/task-vectors/{task}",
                        "mergeline.task_vector_sha256": dataset.digest,
                        "mergeline.cache_hit": "false",
                    },
                    history=[{"step": step, "loss": 1.0 / (step + 1)} for step in range(4)],
                )
            plot = self.scratch / "objective.png"
            plot.write_bytes(b"\x89PNG\r\n\x1a\n")
            made["search"] = tracker.log_search(
                SEARCH_ROWS, "objective", SEARCH_ROWS[1], plots={"objective": str(plot)}
            )
            made["published"] = tracker.publish(
                str(self.model_dir),
                str(self.code_path),
                REGISTERED_MODEL,
                tags={f"mergeline.dataset.{t}": d.digest for t, d in DATASETS.items()},
                aliases=["candidate"],
                metrics={"test.mean_normalized_accuracy": 0.95},
            )
            tracker.log_summary({"run_id": "run-0001", "status": "succeeded"})
        return made

    def check(self, uri: str, made: dict[str, Any]) -> None:
        """Assert, through MlflowClient only, everything :meth:`record` should have logged."""
        client = MlflowClient(tracking_uri=uri)
        parent = client.get_run(made["parent"])
        assert (parent.info.run_name, parent.info.status) == ("run-0001", "FINISHED")
        assert parent.data.tags["mergeline.run_id"] == "run-0001"
        assert [a.path for a in client.list_artifacts(made["parent"])] == ["summary.json"]

        for task, run_id in made["finetune"].items():
            run = client.get_run(run_id)
            assert run.data.tags["mlflow.parentRunId"] == made["parent"]
            assert (run.info.run_name, run.info.status) == (f"finetune/{task}", "FINISHED")
            assert run.data.params["optimizer.name"] == "adamw"
            assert run.data.tags["mergeline.task_vector_sha256"] == DATASETS[task].digest
            [dataset_input] = run.inputs.dataset_inputs
            full_digest = DATASETS[task].digest  # MLflow keeps 36 characters as the digest
            assert dataset_input.dataset.name == task
            assert dataset_input.dataset.digest == full_digest[:36]
            assert {t.key: t.value for t in dataset_input.tags}["mergeline.digest"] == full_digest
            assert json.loads(dataset_input.dataset.profile)["digest"] == full_digest
            assert "secret" not in dataset_input.dataset.source
            assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1, 2, 3]

        search = client.get_run(made["search"])
        assert search.data.tags["mlflow.parentRunId"] == made["parent"]
        assert search.data.params["best.method"] == "ties"
        history = client.get_metric_history(made["search"], "objective")
        assert sorted((m.step, m.value) for m in history) == [(0, 0.7), (1, 0.9), (2, 0.8)]
        csv_path = client.download_artifacts(made["search"], "candidates.csv", str(self.scratch))
        with open(csv_path, newline="") as handle:
            candidates = list(csv.DictReader(handle))
        assert [row["params.density"] for row in candidates] == ["0.2", "0.5", ""]
        plots = client.list_artifacts(made["search"], "plots")
        assert [a.path for a in plots] == ["plots/objective.png"]

        published = made["published"]
        version = client.get_model_version(REGISTERED_MODEL, str(published.version))
        assert version.run_id == published.mlflow_run_id
        assert version.tags["mergeline.dataset.mnli"] == DATASETS["mnli"].digest
        assert "candidate" in version.aliases
        publish_run = client.get_run(published.mlflow_run_id)
        assert publish_run.data.tags["mlflow.parentRunId"] == made["parent"]

    def predict(self, uri: str, alias: str) -> np.ndarray:
        """Load ``models:/<model>@<alias>`` as pyfunc; predict on ``[[1, 1], [1, 2]]``."""
        mlflow.set_tracking_uri(uri)
        try:
            model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{alias}")
            return np.ravel(model.predict(np.array([[1.0, 1.0], [1.0, 2.0]], dtype=np.float32)))
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture
def lineage_flow(tiny_model_dir: Path, pyfunc_code_path: Path, tmp_path: Path) -> LineageFlow:
    """Record and check a pipeline-shaped run with the tiny model."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return LineageFlow(tiny_model_dir, pyfunc_code_path, scratch)


@pytest.fixture
def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    return free_port()

"""A causal LM from a GGUF file on S3, with an S3 store and a real MLflow server, end to end.

The base is a tiny tied Llama written as a float32 GGUF file (``tests/lm_fixtures.py``) under
an ``s3://`` prefix: the run copies the file once, dequantizes it, keeps θ0 in the S3 store,
fine-tunes, publishes a Hugging Face directory, registers it with MLflow's transformers flavor,
and its lineage verifies.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from tests.conftest_s3 import BUCKET, S3Server
from tests.integration.test_causal_lm_pipeline import _tasks
from tests.lm_fixtures import write_tiny_llama_gguf

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def test_a_gguf_base_on_s3_fine_tunes_publishes_and_verifies(
    tmp_path: Path, s3_server: S3Server, s3_uri: str, mlflow_server: str, monkeypatch
) -> None:
    import mlflow

    monkeypatch.setenv("MERGELINE_CACHE", str(tmp_path / "cache"))
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    key = f"{uuid.uuid4().hex[:8]}/models/tiny-llama/tiny.gguf"
    s3_server.client().upload_file(str(tmp_path / "tiny.gguf"), BUCKET, key)
    name = f"lm-s3-{uuid.uuid4().hex[:6]}"
    document = {
        "name": name,
        "base_model": {
            "source": "hf",
            "kind": "causal_lm",
            "model": f"s3://{BUCKET}/{key.rsplit('/', 1)[0]}",
            "gguf_file": "tiny.gguf",
            "endpoint_url": s3_server.endpoint,
            "max_length": 32,
        },
        "tasks": _tasks(tmp_path / "data"),
        "finetune": {"steps": 4, "batch_size": 8, "lr": 1e-2},
        "merge": {
            "candidates": [
                {"method": "task_arithmetic", "coefficient": {"start": 0, "stop": 1, "num": 3}}
            ]
        },
        "evaluation": {"val_fraction": 0.2, "max_new_tokens": 3},
        "storage": {"uri": s3_uri, "endpoint_url": s3_server.endpoint},
        "tracking": {"uri": mlflow_server, "experiment": name, "registered_model": name},
    }
    console = Console(file=io.StringIO(), width=200)
    summary = run_pipeline(validate_document(document), console, tmp_path / "summary.json")
    assert summary["status"] == "succeeded" and summary["model"]["version"] == 1
    assert summary["model"]["uri"].startswith(f"{s3_uri}/models/{name}/")
    assert {"exact_match"} == set(summary["best"]["test"]["report"])

    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    assert isinstance(served.predict(["what is the capital of france ?"])[0], str)

    result = CliRunner().invoke(
        app, ["lineage", f"models:/{name}/1", "--tracking-uri", mlflow_server, "--json"]
    )
    assert result.exit_code == 0, result.output
    lineage = json.loads(result.stdout)
    statuses = [v["status"] for v in lineage["task_vectors"]]
    statuses += [lineage["merged_model"]["status"], lineage["base_model"]["status"]]
    assert statuses == ["verified"] * 4

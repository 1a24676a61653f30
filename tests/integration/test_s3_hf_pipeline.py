"""A Hugging Face base on an S3 store (moto) with a real MLflow server, end to end.

The merged model of an ``hf`` base has a ``transformers/`` sub-prefix: publishing must copy
it (and every other nested file) out of the store before MLflow logs the model. The run goes
through publish, registration, ``mlflow.pyfunc.load_model`` + predict and ``lineage``.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from pipelines.stages.datasets import load_dataset
from storage.errors import ArtifactError
from tests.conftest_s3 import BUCKET, S3Server
from tests.hf_fixtures import write_text_task, write_tiny_bert

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]
pytest.importorskip("transformers")
EVALUATION = {"val_fraction": 0.1, "val_max": 5000, "split_seed": 0}


def test_a_hugging_face_base_on_s3_publishes_registers_serves_and_verifies(
    tmp_path: Path, s3_server: S3Server, s3_uri: str, mlflow_server: str
) -> None:
    import mlflow

    name = f"text-s3-{uuid.uuid4().hex[:6]}"
    tasks = [
        {"name": f"words{i}", "dataset": write_text_task(tmp_path / f"words{i}", i, 60, 30)}
        for i in (1, 2)
    ]
    document = {
        "name": name,
        "base_model": {
            "source": "hf",
            "model": str(write_tiny_bert(tmp_path / "tiny-bert")),
            "max_length": 16,
        },
        "tasks": tasks,
        "finetune": {"steps": 4, "batch_size": 16, "lr": 1e-3},
        "merge": {
            "candidates": [
                {"method": "task_arithmetic", "coefficient": {"start": 0, "stop": 1, "num": 3}}
            ]
        },
        "storage": {"uri": s3_uri, "endpoint_url": s3_server.endpoint},
        "tracking": {"uri": mlflow_server, "experiment": name, "registered_model": name},
    }
    console = Console(file=io.StringIO(), width=200)
    summary = run_pipeline(validate_document(document), console, tmp_path / "summary.json")
    assert summary["status"] == "succeeded"
    model = summary["model"]
    assert model["uri"].startswith(f"{s3_uri}/models/{name}/") and model["version"] == 1

    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    for index, task in enumerate(("words1", "words2")):
        data = load_dataset(tasks[index]["dataset"], EVALUATION, task)
        predicted = served.predict(pd.DataFrame({"text": list(data.x_test)}), params={"task": task})
        accuracy = float(np.mean(np.asarray(predicted) == data.y_test))
        assert accuracy == pytest.approx(summary["best"]["test"]["per_task"][task], abs=1e-9)

    result = CliRunner().invoke(
        app, ["lineage", f"models:/{name}/1", "--tracking-uri", mlflow_server, "--json"]
    )
    assert result.exit_code == 0, result.output
    lineage = json.loads(result.stdout)
    assert lineage["merged_model"]["uri"] == model["uri"]
    assert lineage["merged_model"]["status"] == "verified"
    assert lineage["base_model"]["status"] == "verified"
    assert {v["status"] for v in lineage["task_vectors"]} == {"verified"}

    # Issue 19 defect 5: on S3 too, a file gone from an artifact is named, --quick included.
    weights = f"{model['uri'].removeprefix(f's3://{BUCKET}/')}/transformers/model.safetensors"
    s3_server.client().delete_object(Bucket=BUCKET, Key=weights)
    for extra in ([], ["--quick"]):
        result = CliRunner().invoke(
            app, ["lineage", f"models:/{name}/1", "--tracking-uri", mlflow_server, *extra]
        )
        assert isinstance(result.exception, ArtifactError)
        assert f"{model['uri']}/transformers/model.safetensors does not exist" in str(
            result.exception
        )
        assert f"merged model {model['uri']} file missing" in result.stdout

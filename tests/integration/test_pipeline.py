"""The whole pipeline on a real local Ray with real MLflow (SQLite, and a real server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from storage.errors import DataError
from tests.conftest import (
    BEST_KEYS,
    MODEL_KEYS,
    SEARCH_KEYS,
    SUMMARY_KEYS,
    TASK_KEYS,
    TIMING_KEYS,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def _run(document: dict, tmp_path: Path, name: str = "summary.json") -> dict:
    return run_pipeline(
        validate_document(document), Console(file=open("/dev/null", "w")), tmp_path / name
    )


def test_pipeline_runs_end_to_end_then_hits_the_cache(tiny_spec: dict, tmp_path: Path) -> None:
    first = _run(tiny_spec, tmp_path)
    assert set(first) == SUMMARY_KEYS
    assert set(first["search"]) == SEARCH_KEYS and set(first["best"]) == BEST_KEYS
    assert set(first["model"]) == MODEL_KEYS and set(first["timings"]) == TIMING_KEYS
    for task in first["tasks"].values():
        assert set(task) == TASK_KEYS
        assert task["cache_hit"] is False
        assert task["finetuned"]["val"] > 0
    assert first["search"]["candidates_evaluated"] == 5
    assert json.loads((tmp_path / "summary.json").read_text()) == first

    store = tmp_path / "store"
    stored = json.loads((store / "runs" / first["run_id"] / "summary.json").read_text())
    assert stored["run_id"] == first["run_id"]
    for task in first["tasks"].values():
        prefix = Path(task["task_vector_uri"].removeprefix("file://"))
        assert {p.name for p in prefix.iterdir()} == {
            "delta.safetensors",
            "head.safetensors",
            "manifest.json",
        }
    assert Path(first["model"]["uri"].removeprefix("file://"), "model.safetensors").is_file()

    client = MlflowClient(tiny_spec["tracking"]["uri"])
    version = client.get_model_version_by_alias("tiny", "candidate")
    assert int(version.version) == first["model"]["version"]
    assert version.tags["mergeline.run_id"] == first["run_id"]
    for name, task in first["tasks"].items():
        assert version.tags[f"mergeline.task.{name}.task_vector_sha256"] == task["sha256"]
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parent = [
        r
        for r in runs
        if r.data.tags.get("mergeline.run_id") == first["run_id"]
        and "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == 2 + 1 + 1  # two fine-tunes, the search, the publish step

    second = _run(tiny_spec, tmp_path, "again.json")
    assert all(task["cache_hit"] for task in second["tasks"].values())
    assert second["best"]["coefficients"] == first["best"]["coefficients"]
    assert second["best"]["val"] == first["best"]["val"]
    assert {t: v["sha256"] for t, v in second["tasks"].items()} == {
        t: v["sha256"] for t, v in first["tasks"].items()
    }
    # nothing changed: the stored scores and the first run's model and version are reused
    assert second["search"]["scores_computed"] == 0
    assert second["model"]["version"] == first["model"]["version"]
    assert second["model"]["reused_from"] == first["run_id"]


def test_published_model_serves_the_evaluated_predictions(tiny_spec: dict, tmp_path: Path) -> None:
    import mlflow
    import numpy as np

    from pipelines.stages.datasets import load_dataset

    summary = _run(tiny_spec, tmp_path)
    mlflow.set_tracking_uri(tiny_spec["tracking"]["uri"])
    model = mlflow.pyfunc.load_model(f"models:/tiny/{summary['model']['version']}")
    data = load_dataset(
        tiny_spec["tasks"][0]["dataset"],
        {"val_fraction": 0.1, "val_max": 5000, "split_seed": 0},
        "t",
    )
    predicted = model.predict(data.x_test, params={"task": "perm1"})
    measured = float((np.asarray(predicted) == data.y_test).mean())
    assert measured == pytest.approx(summary["best"]["test"]["per_task"]["perm1"], abs=1e-9)


def test_a_failed_run_registers_nothing(tiny_spec: dict, tmp_path: Path) -> None:
    tiny_spec["tasks"][1]["dataset"]["classes"] = [1, 99]
    with pytest.raises(DataError, match="99"):
        _run(validate_document(tiny_spec).model_dump(mode="json"), tmp_path)
    client = MlflowClient(tiny_spec["tracking"]["uri"])
    assert client.search_registered_models() == []


def test_pipeline_against_a_real_mlflow_server(
    tiny_spec: dict, tmp_path: Path, mlflow_server: str
) -> None:
    tiny_spec["tracking"] = {
        "uri": mlflow_server,
        "experiment": "tiny-server",
        "registered_model": "tiny-server",
    }
    summary = _run(tiny_spec, tmp_path)
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("tiny-server", "candidate")
    assert int(version.version) == summary["model"]["version"]
    assert version.tags["mergeline.base_digest"]

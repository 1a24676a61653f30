"""Publishing logs the served model with type hints and an input example: MLflow has no
warning to print about either, and the example is what the model accepts."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from rich.console import Console

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def test_publishing_gives_no_mlflow_warning_and_logs_an_input_example(
    tiny_spec: dict, tmp_path: Path
) -> None:
    import mlflow

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_pipeline(validate_document(tiny_spec), Console(quiet=True))
    advice = [
        str(w.message)
        for w in caught
        if "type hint" in str(w.message).lower() or "input example" in str(w.message).lower()
    ]
    assert advice == []
    mlflow.set_tracking_uri(tiny_spec["tracking"]["uri"])
    uri = f"models:/tiny/{summary['model']['version']}"
    example = mlflow.models.Model.load(uri).load_input_example(
        mlflow.artifacts.download_artifacts(uri)
    )
    assert example is not None and example.shape[0] == 1
    model = mlflow.pyfunc.load_model(uri)
    assert model.predict(example, params={"task": "perm2"}).shape == (1,)

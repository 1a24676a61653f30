"""``finetune.on_task_failure``: a task that fails for good fails the run, or is skipped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.run.pipeline import run_pipeline
from pipelines.run.recovery import TaskFailedError
from pipelines.spec.load import validate_document
from tests.conftest import SUMMARY_KEYS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def _run(document: dict) -> dict:
    return run_pipeline(validate_document(document), Console(file=open(os.devnull, "w")))


def test_a_diverging_task_fails_the_run_naming_the_task_and_the_cause(tiny_spec: dict) -> None:
    tiny_spec["finetune"]["lr"] = 1e30  # the first update overflows every weight
    with pytest.raises(TaskFailedError) as failure:
        _run(tiny_spec)
    message = str(failure.value)
    assert "fine-tune of task 'perm" in message
    assert "DivergenceError" in message and "at step 1" in message
    assert MlflowClient(tiny_spec["tracking"]["uri"]).search_registered_models() == []


def test_skip_merges_the_other_tasks_and_records_the_skipped_one(
    tiny_spec: dict, tmp_path: Path
) -> None:
    # Finite inputs (the data checks pass) that overflow the base model's features.
    rng = np.random.default_rng(0)
    for split, rows in (("train", 200), ("test", 60)):
        x = np.sign(rng.normal(size=(rows, 64))).astype(np.float32) * np.float32(3e38)
        np.savez(tmp_path / f"{split}.npz", x=x, y=rng.integers(0, 10, rows))
    tiny_spec["tasks"].append(
        {
            "name": "huge",
            "dataset": {
                "source": "files",
                "train": str(tmp_path / "train.npz"),
                "test": str(tmp_path / "test.npz"),
            },
        }
    )
    tiny_spec["finetune"]["on_task_failure"] = "skip"
    summary = _run(tiny_spec)
    assert set(summary) == SUMMARY_KEYS | {"skipped"}
    assert list(summary["skipped"]) == ["huge"]
    assert "DataError" in summary["skipped"]["huge"] and "not finite" in summary["skipped"]["huge"]
    assert set(summary["tasks"]) == {"perm1", "perm2"}
    assert set(summary["best"]["coefficients"]) == {"perm1", "perm2"}
    version = MlflowClient(tiny_spec["tracking"]["uri"]).get_model_version("tiny", "1")
    assert version.tags["mergeline.tasks"] == "perm1,perm2"

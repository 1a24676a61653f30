"""Checks of what a pipeline run recorded in MLflow, against DESIGN.md's lineage structure."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_recorded_lineage(
    tracking_uri: str, experiment: str, summary: dict[str, Any], scratch: Path
) -> dict[str, Any]:
    """Assert the parent run, its stage runs and the registered version; returns the version
    tags."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], f"tags.`mergeline.run_id` = '{summary['run_id']}'")
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mergeline.spec_digest"] and parent.data.tags["mergeline.code_version"]
    children = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_name = {run.info.run_name: run for run in children}
    tasks = summary["tasks"]
    assert set(by_name) == {f"finetune/{t}" for t in tasks} | {"search", "publish"}

    for task, info in tasks.items():
        run = by_name[f"finetune/{task}"]
        assert run.data.tags["mergeline.task_vector_uri"] == info["task_vector_uri"]
        assert run.data.tags["mergeline.task_vector_sha256"] == info["sha256"]
        assert run.data.tags["mergeline.cache_hit"] == str(info["cache_hit"]).lower()
        [dataset_input] = run.inputs.dataset_inputs
        full = {t.key: t.value for t in dataset_input.tags}["mergeline.digest"]
        assert dataset_input.dataset.name == task and len(full) == 64
        assert dataset_input.dataset.digest == full[:36] and dataset_input.dataset.source

    search = by_name["search"]
    objective = client.get_metric_history(search.info.run_id, "mean_normalized_accuracy")
    assert len(objective) == summary["search"]["candidates_evaluated"]
    csv_path = client.download_artifacts(search.info.run_id, "candidates.csv", str(scratch))
    with open(csv_path, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == summary["search"]["candidates_evaluated"]
    plots = {a.path for a in client.list_artifacts(search.info.run_id, "plots")}
    assert plots == {"plots/score_vs_coefficient.png", "plots/best_per_task.png"}
    for plot in plots:
        local = client.download_artifacts(search.info.run_id, plot, str(scratch))
        assert Path(local).read_bytes().startswith(PNG_MAGIC)

    model = summary["model"]
    publish = by_name["publish"]
    version = client.get_model_version(model["registered_model"], str(model["version"]))
    assert version.run_id == publish.info.run_id
    [logged] = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{publish.info.run_id}'"
    )
    assert logged.model_id in version.source
    tags = version.tags
    assert tags["mergeline.code_version"] == parent.data.tags["mergeline.code_version"]
    assert tags["mergeline.model_uri"] == model["uri"] and len(tags["mergeline.base_digest"]) == 64
    for task, info in tasks.items():
        assert tags[f"mergeline.task.{task}.task_vector_uri"] == info["task_vector_uri"]
        assert tags[f"mergeline.task.{task}.task_vector_sha256"] == info["sha256"]
        assert len(tags[f"mergeline.task.{task}.dataset_digest"]) == 64
    promotion = model["promotion"]
    assert tags["mergeline.promotion.promoted"] == str(promotion["promoted"]).lower()
    assert tags["mergeline.promotion.reason"] == promotion["reason"]
    assert float(tags["mergeline.promotion.score"]) == promotion["score"]
    assert sorted(version.aliases) == sorted(model["aliases"])
    return dict(tags)


def every_digest(tags: dict[str, Any]) -> set[str]:
    """Every sha256 and content digest a version's tags record."""
    keys = ("sha256", "digest")
    return {value for key, value in tags.items() if key.endswith(keys) and value}

"""The tiny pipeline on S3 (moto) with a real MLflow server, then walked back with `lineage`."""

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
from storage.artifacts import verify_artifact
from storage.objectstore import open_store
from tests.conftest_mlflow import SERVER_ROOTS
from tests.conftest_s3 import BUCKET, FAKE_SECRET_KEY, S3Server, grep_tree
from tests.integration.lineage_checks import check_recorded_lineage, every_digest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def _run(document: dict, tmp_path: Path) -> tuple[dict, str]:
    output = io.StringIO()
    console = Console(file=output, width=200, soft_wrap=True)
    summary = run_pipeline(validate_document(document), console, tmp_path / "summary.json")
    return summary, output.getvalue()


def _lineage(model_uri: str, tracking_uri: str) -> tuple[dict, str]:
    result = CliRunner().invoke(
        app, ["lineage", model_uri, "--tracking-uri", tracking_uri, "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stdout


def test_pipeline_on_s3_with_an_mlflow_server_is_auditable(
    tiny_spec: dict,
    tmp_path: Path,
    s3_server: S3Server,
    s3_uri: str,
    mlflow_server: str,
) -> None:
    name = f"tiny-s3-{uuid.uuid4().hex[:6]}"
    tiny_spec["storage"] = {"uri": s3_uri, "endpoint_url": s3_server.endpoint}
    tiny_spec["tracking"] = {"uri": mlflow_server, "experiment": name, "registered_model": name}

    first, _ = _run(tiny_spec, tmp_path)
    assert first["model"]["uri"].startswith(f"{s3_uri}/models/{name}/")
    assert first["model"]["aliases"] == ["candidate", "champion"]
    assert first["model"]["promotion"] == {
        "promoted": True,
        "reason": "no champion yet",
        "champion_score": None,
        "score": first["best"]["test"]["mean_normalized_accuracy"],
    }
    first_tags = check_recorded_lineage(mlflow_server, name, first, tmp_path)

    # A cached task vector rots in the store: the next run reports it and rebuilds it.
    corrupt = first["tasks"]["perm1"]["task_vector_uri"]
    key = corrupt.removeprefix(f"s3://{BUCKET}/") + "/delta.safetensors"
    s3_server.client().put_object(Bucket=BUCKET, Key=key, Body=b"not the task vector")
    tiny_spec["publish"] = {"min_improvement": 0.5}  # beyond reach: this version stays candidate
    # The rebuilt vector is bit-identical (the fine-tune is deterministic), so the same grid
    # would reuse the first run's scores and model; a coefficient off that grid makes a new one.
    tiny_spec["merge"] = {
        "candidates": [{"method": "task_arithmetic", "coefficient": {"values": [0.6]}}]
    }
    second, output = _run(tiny_spec, tmp_path)
    assert "checksum" in output and f"{corrupt}/delta.safetensors" in output
    assert second["tasks"]["perm1"]["cache_hit"] is False
    assert second["tasks"]["perm2"]["cache_hit"] is True
    store = open_store(s3_uri, s3_server.endpoint)
    assert verify_artifact(store, corrupt.removeprefix(s3_uri + "/")) is None
    promotion = second["model"]["promotion"]
    assert second["model"]["aliases"] == ["candidate"] and promotion["promoted"] is False
    assert "by at least 0.5" in promotion["reason"]
    assert promotion["champion_score"] == first["model"]["promotion"]["score"]
    second_tags = check_recorded_lineage(mlflow_server, name, second, tmp_path)
    assert float(second_tags["mergeline.promotion.champion_score"]) == promotion["champion_score"]

    champion, champion_text = _lineage(f"models:/{name}@champion", mlflow_server)
    candidate, candidate_text = _lineage(f"models:/{name}@candidate", mlflow_server)
    assert champion["registered_version"]["version"] == first["model"]["version"]
    assert candidate["registered_version"]["version"] == second["model"]["version"]
    for lineage, summary, tags, text in (
        (champion, first, first_tags, champion_text),
        (candidate, second, second_tags, candidate_text),
    ):
        assert all(digest in text for digest in every_digest(tags))
        vectors = {v["task"]: v for v in lineage["task_vectors"]}
        for task, info in summary["tasks"].items():
            assert (vectors[task]["uri"], vectors[task]["sha256"]) == (
                info["task_vector_uri"],
                info["sha256"],
            )
            assert vectors[task]["mode"] == "standard"
        assert lineage["merged_model"]["uri"] == summary["model"]["uri"]
        assert lineage["merged_model"]["status"] == "verified"
        assert lineage["merged_model"]["candidate"]["method"] == "task_arithmetic"
        assert lineage["base_model"]["status"] == "verified"
        assert {d["task"] for d in lineage["datasets"]} == {"perm1", "perm2"}
    assert {v["status"] for v in candidate["task_vectors"]} == {"verified"}
    assert {v["task"]: v["status"] for v in champion["task_vectors"]}["perm2"] == "verified"
    by_version = CliRunner().invoke(
        app,
        ["lineage", f"models:/{name}/{first['model']['version']}", "--tracking-uri", mlflow_server],
    )
    assert by_version.exit_code == 0 and first["tasks"]["perm2"]["sha256"] in by_version.stdout

    # The secret access key is nowhere: not in MLflow's database or artifacts, not in the store.
    secret = FAKE_SECRET_KEY.encode()
    server_root = SERVER_ROOTS[mlflow_server]
    database = (server_root / "mlflow.db").read_bytes()
    assert first["run_id"].encode() in database  # the scan does read the records
    assert grep_tree(server_root, secret) == []
    objects = {
        key: s3_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        for key in s3_server.keys()
    }
    assert any(first["tasks"]["perm2"]["sha256"].encode() in body for body in objects.values())
    assert [key for key, body in objects.items() if secret in body] == []
    assert grep_tree(tmp_path, secret) == []

"""The quickstart, unchanged, against S3 (moto on 127.0.0.1) and a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SUMMARY_KEYS
from tests.conftest_s3 import S3Server
from tests.e2e.test_cli import QUICKSTART, mergeline

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Fewer steps and candidates than the example: the same stages, faster.
SMALLER = [
    "base_model.pretrain.steps=150",
    "finetune.steps=40",
    "merge.candidates.0.coefficient.num=6",
]


def test_quickstart_on_s3_and_an_mlflow_server(
    tmp_path: Path, s3_server: S3Server, s3_uri: str, mlflow_server: str
) -> None:
    overrides = [
        f"storage.uri={s3_uri}",
        f"storage.endpoint_url={s3_server.endpoint}",
        f"tracking.uri={mlflow_server}",
        *SMALLER,
    ]
    sets = [arg for item in overrides for arg in ("--set", item)]
    run = mergeline("run", str(QUICKSTART), *sets, "--summary", "summary.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["model"]["uri"].startswith(s3_uri)
    assert "champion" in summary["model"]["aliases"]
    assert not (tmp_path / ".mergeline" / "store").exists()  # everything went to S3

    listed = mergeline("ls", "--store", s3_uri, "--endpoint-url", s3_server.endpoint, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in summary["tasks"]:
        assert name in listed.stdout

    for alias in ("champion", "candidate"):
        walked = mergeline(
            "lineage", f"models:/digits@{alias}", "--tracking-uri", mlflow_server, cwd=tmp_path
        )
        assert walked.returncode == 0, walked.stderr
        for info in summary["tasks"].values():
            assert f"{info['task_vector_uri']} verified" in walked.stdout
            assert info["sha256"] in walked.stdout

    bad = mergeline("lineage", "digits@champion", "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "models:/<name>@<alias>" in bad.stderr

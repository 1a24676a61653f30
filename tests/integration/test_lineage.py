"""Lineage with the default local SQLite tracking, and tracking.on_error."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from storage.errors import ServiceError
from tests.conftest_s3 import FAKE_SECRET_KEY, grep_tree
from tests.integration.lineage_checks import check_recorded_lineage, every_digest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def _run(document: dict, tmp_path: Path) -> tuple[dict, str]:
    output = io.StringIO()
    summary = run_pipeline(validate_document(document), Console(file=output, width=200), None)
    return summary, output.getvalue()


def test_local_sqlite_lineage_walks_back_from_the_champion(
    tiny_spec: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    summary, _ = _run(tiny_spec, tmp_path)
    tracking = tiny_spec["tracking"]["uri"]
    tags = check_recorded_lineage(tracking, "tiny", summary, tmp_path)
    assert summary["model"]["aliases"] == ["candidate", "champion"]

    as_json = CliRunner().invoke(
        app, ["lineage", "models:/tiny@champion", "--tracking-uri", tracking, "--json"]
    )
    assert as_json.exit_code == 0, as_json.output
    lineage = json.loads(as_json.stdout)
    assert all(digest in as_json.stdout for digest in every_digest(tags))
    statuses = [v["status"] for v in lineage["task_vectors"]]
    statuses += [lineage["merged_model"]["status"], lineage["base_model"]["status"]]
    assert statuses == ["verified"] * 4 and lineage["store"]["error"] is None

    as_text = CliRunner().invoke(app, ["lineage", "models:/tiny/1", "--tracking-uri", tracking])
    assert as_text.exit_code == 0, as_text.output
    for task, info in summary["tasks"].items():
        assert f"task vector {task} (standard) {info['task_vector_uri']} verified" in as_text.stdout
        assert f"sha256 {info['sha256']}" in as_text.stdout
    assert f"base model digest {tags['mergeline.base_digest']}" in as_text.stdout

    missing = CliRunner().invoke(app, ["lineage", "models:/tiny@nope", "--tracking-uri", tracking])
    assert "models:/tiny@nope does not exist" in str(missing.exception)

    listed = CliRunner().invoke(app, ["ls", "--store", tiny_spec["storage"]["uri"], "--json"])
    listing = json.loads(listed.stdout)
    assert {row["sha256"] for row in listing["task_vectors"]} == {
        info["sha256"] for info in summary["tasks"].values()
    }
    assert [row["uri"] for row in listing["models"]] == [summary["model"]["uri"]]

    secret = FAKE_SECRET_KEY.encode()  # in this process's environment, nowhere on disk
    assert grep_tree(tmp_path, summary["run_id"].encode())  # the scan reads the records
    assert grep_tree(tmp_path, secret) == []

    _damaged_files_are_not_verified(summary, tracking, capsys, monkeypatch)


def _damaged_files_are_not_verified(
    summary: dict, tracking: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``verified`` means every listed file has its size and sha256; ``--quick`` sizes only."""
    from pipelines import cli

    def lineage(*extra: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["mergeline", "lineage", "models:/tiny/1", *extra])
        capsys.readouterr()  # what the test printed so far
        try:
            cli.main()
            code = 0
        except SystemExit as exited:
            code = exited.code
        output = capsys.readouterr()
        return code, output.out, output.err

    vector = summary["tasks"]["perm1"]["task_vector_uri"]
    delta = Path(vector.removeprefix("file://"), "delta.safetensors")
    data = bytearray(delta.read_bytes())
    data[-1] ^= 0xFF  # same size, another sha256
    delta.write_bytes(bytes(data))
    code, out, err = lineage("--tracking-uri", tracking, "--json")
    statuses = {v["task"]: v["status"] for v in json.loads(out)["task_vectors"]}
    assert statuses == {"perm1": "corrupt", "perm2": "verified"} and code == 2
    assert len(err.strip().splitlines()) == 1 and f"{vector}/delta.safetensors" in err
    code, out, err = lineage("--tracking-uri", tracking, "--quick")
    assert code == 0, err
    assert "checked: sizes only (--quick): sha256 not read" in out
    assert f"{vector} sizes match" in out and " verified" not in out

    model = summary["model"]["uri"]
    Path(model.removeprefix("file://"), "model.safetensors").unlink()
    for extra in ((), ("--quick",)):
        code, out, err = lineage("--tracking-uri", tracking, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"{model}/model.safetensors does not exist" in err
        assert f"merged model {model} file missing" in out


def test_an_unreachable_server_stops_the_run_before_fine_tuning(
    tiny_spec: dict, tmp_path: Path, unused_port: int
) -> None:
    tiny_spec["tracking"] = {"uri": f"http://127.0.0.1:{unused_port}"}
    with pytest.raises(ServiceError, match=f"127.0.0.1:{unused_port} is unreachable"):
        _run(tiny_spec, tmp_path)
    assert not (tmp_path / "store" / "task-vectors").exists()


def test_on_error_warn_runs_untracked_and_registers_nothing(
    tiny_spec: dict, tmp_path: Path, unused_port: int
) -> None:
    tiny_spec["tracking"] = {"uri": f"http://127.0.0.1:{unused_port}", "on_error": "warn"}
    summary, output = _run(tiny_spec, tmp_path)
    assert "tracking is off for this run" in output
    model = summary["model"]
    assert (model["version"], model["mlflow_run_id"], model["aliases"]) == (None, None, [])
    assert model["promotion"]["promoted"] is False
    assert model["promotion"]["reason"].startswith("not registered: ")
    assert Path(model["uri"].removeprefix("file://"), "manifest.json").is_file()
    assert (tmp_path / "store" / "runs" / summary["run_id"] / "summary.json").is_file()

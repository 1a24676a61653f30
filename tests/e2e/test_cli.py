"""The CLI as a user runs it: the quickstart twice, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SUMMARY_KEYS

pytestmark = pytest.mark.e2e
QUICKSTART = REPO / "examples" / "quickstart.yaml"


#: Ray's worker pool for the CLI's local Ray in these tests (Ray reads ``RAY_<setting>``): up to
#: 6 worker processes instead of one per CPU, so the publish tasks after the search reuse the
#: fine-tune workers instead of starting (and importing torch in) fresh ones. It changes where
#: tasks run, not what they do; a user's run keeps Ray's default.
WARM_WORKERS = {"RAY_num_workers_soft_limit": "6"}


#: A cap for a hung CLI run, not a speed check: with another test run and a busy core beside
#: it on 2 cores, the SmolLM2 example ran past 600 s (195 s in a CI run alone).
RUN_TIMEOUT_S = 1800.0


def mergeline(
    *args: str, cwd: Path, timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"COLUMNS": "120", "NO_COLOR": "1"} | WARM_WORKERS
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_quickstart_runs_twice_and_the_second_run_is_all_cache_hits(tmp_path: Path) -> None:
    first = mergeline("run", str(QUICKSTART), "--summary", "first.json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "zero-shot" in first.stdout and "fine-tuned" in first.stdout and "merged" in first.stdout
    summary = json.loads((tmp_path / "first.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "succeeded" and summary["mode"] == "standard"
    assert len(summary["tasks"]) >= 3
    assert not any(task["cache_hit"] for task in summary["tasks"].values())
    zero_shot = [t["zero_shot"]["test"] / t["finetuned"]["test"] for t in summary["tasks"].values()]
    assert all(t["zero_shot"]["test"] < t["finetuned"]["test"] for t in summary["tasks"].values())
    merged = summary["best"]["test"]["mean_normalized_accuracy"]
    assert merged - sum(zero_shot) / len(zero_shot) >= 0.10
    assert "candidate" in summary["model"]["aliases"]
    assert (
        tmp_path / ".mergeline" / "store" / "runs" / summary["run_id"] / "summary.json"
    ).is_file()

    second = mergeline("run", str(QUICKSTART), "--summary", "second.json", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "second.json").read_text())
    assert all(task["cache_hit"] for task in again["tasks"].values())
    assert again["best"]["coefficients"] == summary["best"]["coefficients"]
    assert again["best"]["method"] == summary["best"]["method"]
    # nothing changed: no candidate scored, no Ray started, the first run's version stands
    assert again["search"]["scores_computed"] == 0
    assert "Ray was not started" in second.stdout and "Ray was not started" not in first.stdout
    assert again["model"]["version"] == summary["model"]["version"]
    assert again["model"]["reused_from"] == summary["run_id"]
    assert "hit" in second.stdout


def test_validate_and_schema(tmp_path: Path) -> None:
    ok = mergeline("validate", str(QUICKSTART), "--set", "finetune.steps=10", cwd=tmp_path)
    assert ok.returncode == 0 and "valid" in ok.stdout
    schema = mergeline("schema", cwd=tmp_path)
    assert schema.returncode == 0
    assert "finetune" in json.loads(schema.stdout)["properties"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "missing.yaml"], "does not exist"),
        (["run", str(QUICKSTART), "--set", "finetune.steps=-5"], "finetune.steps"),
        (
            ["run", str(QUICKSTART), "--set", "merge.candidates.0.method=nope"],
            "unknown merge method",
        ),
        (["run", str(QUICKSTART), "--set", "tasks.0.dataset.name=mnist"], "tasks[0].dataset.name"),
        (["run", str(QUICKSTART), "--set", "tasks.0.dataset.classes=[1, 99]"], "99"),
        (["validate", str(QUICKSTART), "--set", "nonsense"], "dotted.key=value"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_registered(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    result = mergeline(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / ".mergeline" / "store" / "models").exists()


@pytest.mark.slow
def test_a_one_cpu_ray_runs_the_search_on_the_one_actor_it_can_start(tmp_path: Path) -> None:
    """merge.num_actors (2) is capped by the cluster's CPUs; a second actor would never start."""
    quick = ["base_model.pretrain.steps=50", "finetune.steps=20", "compute.num_cpus=1"]
    settings = [arg for item in quick for arg in ("--set", item)]
    result = mergeline(
        "run", str(QUICKSTART), "--summary", "one.json", *settings, cwd=tmp_path, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "one.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["search"]["candidates_evaluated"] == 21

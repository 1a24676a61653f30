"""The linear-mode quickstart and ``mergeline diagnose disentanglement`` as a user runs them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, SUMMARY_KEYS
from tests.e2e.test_cli import mergeline

pytestmark = pytest.mark.e2e
QUICKSTART_LINEAR = REPO / "examples" / "quickstart-linear.yaml"


@pytest.mark.slow
def test_linear_quickstart_then_the_disentanglement_diagnostic(tmp_path: Path) -> None:
    result = mergeline("run", str(QUICKSTART_LINEAR), "--summary", "linear.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "linear.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["mode"] == "linear" and summary["status"] == "succeeded"
    assert summary["search"]["strategy"] == "coordinate_ascent"
    assert summary["search"]["fast_path"] is True
    assert set(summary["best"]["coefficients"]) == set(summary["tasks"])
    tasks = summary["tasks"].values()
    assert all(t["zero_shot"]["test"] < t["finetuned"]["test"] for t in tasks)
    zero_shot = sum(t["zero_shot"]["test"] / t["finetuned"]["test"] for t in tasks) / len(tasks)
    assert summary["best"]["test"]["mean_normalized_accuracy"] - zero_shot >= 0.10

    out = tmp_path / "diagnostics"
    diagnose = mergeline(
        "diagnose",
        "disentanglement",
        str(QUICKSTART_LINEAR),
        "--tasks",
        "digits-perm1,digits-perm2",
        "--out",
        str(out),
        "--num",
        "5",
        cwd=tmp_path,
    )
    assert diagnose.returncode == 0, diagnose.stderr[-3000:]
    assert "cache hit" in diagnose.stdout  # it reused the run's task vectors
    stem = out / "disentanglement-digits-perm1-digits-perm2"
    with stem.with_suffix(".csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 25
    xi = {(float(r["alpha1"]), float(r["alpha2"])): float(r["xi"]) for r in rows}
    assert xi[(0.0, 0.0)] == 0.0  # θ0 against θ0: no prediction can change
    assert max(xi.values()) > 0.0 and all(0.0 <= v <= 2.0 for v in xi.values())
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_refuses_tasks_that_are_not_in_the_spec(tmp_path: Path) -> None:
    result = mergeline(
        "diagnose",
        "disentanglement",
        str(QUICKSTART_LINEAR),
        "--tasks",
        "digits-perm1,nope",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "nope" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1

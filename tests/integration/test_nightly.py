"""The nightly example on a real local Ray: one task's file changes, only that task retrains.

Runs ``examples/nightly-files.yaml`` (shrunk to seconds) on the files that
``examples/make_nightly_data.py`` writes, edits one task's train file, runs again, then lists
the runs and writes the report of the second one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from pipelines.commands.runs import list_runs, write_report
from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import apply_overrides, read_document, validate_document
from storage.objectstore import open_store
from tests.conftest import REPO, TASK_KEYS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]

SPEC = REPO / "examples" / "nightly-files.yaml"
SMALL = [
    "base_model.hidden=[32]",
    "base_model.pretrain.steps=60",
    "finetune.steps=30",
    "finetune.batch_size=32",
    "merge.candidates.0.coefficient.num=5",
]


def nightly_spec(data: Path, tmp_path: Path) -> dict:
    """The example spec, reading ``data`` and storing under ``tmp_path``, shrunk."""
    text = SPEC.read_text().replace("examples/nightly-data/", f"{data}/")
    source = tmp_path / "nightly.yaml"
    source.write_text(text)
    overrides = SMALL + [
        f"storage.uri=file://{tmp_path}/store",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    return apply_overrides(read_document(source), overrides)


def run(document: dict) -> dict:
    return run_pipeline(validate_document(document), Console(file=open("/dev/null", "w")))


def example_data(tmp_path: Path) -> tuple[Path, dict]:
    """The example's files under ``tmp_path/data`` and the shrunk spec that reads them."""
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_nightly_data.py"), str(data)],
        check=True,
        capture_output=True,
    )
    return data, nightly_spec(data, tmp_path)


def test_changing_one_file_retrains_exactly_that_task(tmp_path: Path) -> None:
    data, document = example_data(tmp_path)

    first = run(document)
    assert set(first["tasks"]) == {"digits-perm1", "digits-perm2", "digits-perm3"}
    for task in first["tasks"].values():
        assert set(task) == TASK_KEYS
        assert task["cache_hit"] is False and task["rebuilt_reason"] == "first run"

    changed = data / "digits-perm2" / "train.jsonl"
    lines = changed.read_text().splitlines()
    changed.write_text("\n".join(lines[:-25]) + "\n")  # tonight's file lost 25 examples
    second = run(document)

    tasks = second["tasks"]
    assert tasks["digits-perm2"]["cache_hit"] is False
    assert tasks["digits-perm2"]["rebuilt_reason"] == "new data digest"
    assert tasks["digits-perm2"]["sha256"] != first["tasks"]["digits-perm2"]["sha256"]
    for name in ("digits-perm1", "digits-perm3"):
        assert tasks[name]["cache_hit"] is True and tasks[name]["rebuilt_reason"] is None
        assert tasks[name]["sha256"] == first["tasks"][name]["sha256"]
    assert second["spec"]["name"] == "digits-nightly"
    # perm2's task vector changed: no stored score applies, all 5 candidates + test are scored
    assert second["search"]["scores_reused"] == 0
    assert second["search"]["scores_computed"] == 6

    store = open_store(f"file://{tmp_path}/store")
    listed = list_runs(store, "digits-nightly")
    assert [row["run_id"] for row in listed] == [first["run_id"], second["run_id"]]
    assert [row["rebuilt"] for row in listed] == [3, 1]
    assert listed[0]["promoted"] is True  # the first version has no champion to beat

    out = tmp_path / "report"
    page = write_report(store, second["run_id"], out)
    text = page.read_text()
    assert "new data digest" in text and second["run_id"] in text
    for name in ("score_vs_coefficient", "best_per_task", "task_accuracies", "history"):
        image = out / f"{name}.png"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{name}.png"' in text


def test_a_night_where_nothing_changed_scores_no_candidate(tmp_path: Path) -> None:
    _, document = example_data(tmp_path)
    first = run(document)
    assert first["search"]["scores_computed"] == 6  # 5 candidates on val, the best on test

    again = run(document)
    assert again["run_id"] != first["run_id"]
    assert all(task["cache_hit"] for task in again["tasks"].values())
    assert again["search"]["scores_computed"] == 0 and again["search"]["scores_reused"] == 6
    assert again["best"] == first["best"]
    # the same model: the previous run's version stands, nothing new is registered
    assert again["model"]["reused_from"] == first["run_id"]
    assert again["model"]["version"] == first["model"]["version"] == 1
    assert again["model"]["uri"] == first["model"]["uri"]
    assert "nothing changed" in again["model"]["promotion"]["reason"]

    # a finer grid keeps the 5 old points: only the 4 new ones are scored (and the test
    # split again only if the best moved)
    finer = apply_overrides(document, ["merge.candidates.0.coefficient.num=9"])
    third = run(finer)
    assert third["search"]["candidates_evaluated"] == 9
    assert third["search"]["scores_reused"] >= 5
    assert 4 <= third["search"]["scores_computed"] <= 5

"""``mergeline runs`` and ``mergeline report`` over summaries in a real (local) store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.commands.runs import describe_candidate, list_runs, write_report
from pipelines.report.report_plots import history_points
from storage.errors import ArtifactError, SpecError
from storage.objectstore import FsspecStore, open_store
from storage.runs import write_candidates
from storage.taskvectors import write_summary

PNG = b"\x89PNG\r\n\x1a\n"


def make_summary(run_id: str, name: str, score: float, champion: bool, rebuilt: str | None):
    tasks = {
        task: {
            "task_vector_uri": f"file:///store/task-vectors/{task}-{run_id}",
            "sha256": "0" * 64,
            "cache_hit": rebuilt is None or task != "t1",
            "rebuilt_reason": rebuilt if task == "t1" else None,
            "zero_shot": {"val": 0.5, "test": 0.5},
            "finetuned": {"val": 0.9, "test": 0.9},
        }
        for task in ("t1", "t2")
    }
    return {
        "run_id": run_id,
        "status": "succeeded",
        "started": None,
        "spec": {"name": name, "digest": "ab" * 32, "objective": "mean_normalized_accuracy"},
        "mode": "standard",
        "tasks": tasks,
        "search": {"candidates_evaluated": 3, "seconds": 1.0, "strategy": "grid"},
        "best": {
            "method": "task_arithmetic",
            "params": {},
            "coefficients": {"t1": 0.4, "t2": 0.4},
            "val": {"mean_normalized_accuracy": score, "mean_accuracy": 0.9 * score},
            "test": {
                "mean_normalized_accuracy": score,
                "mean_accuracy": 0.9 * score,
                "per_task": {"t1": 0.9 * score, "t2": 0.9 * score},
            },
        },
        "model": {
            "uri": f"file:///store/models/m/{run_id}",
            "mlflow_run_id": "abc",
            "registered_model": "m",
            "version": 1,
            "aliases": ["candidate", "champion"] if champion else ["candidate"],
            "promotion": {"promoted": champion, "reason": "<b>no champion yet</b>"},
        },
        "timings": {"finetune_s": 1.0, "search_s": 1.0, "total_s": 3.0},
    }


def rows(scores: list[float]) -> list[dict]:
    return [
        {
            "id": f"task_arithmetic-{i}",
            "method": "task_arithmetic",
            "params": {},
            "coefficient": i / 2,
            "accuracy": {"t1": s * 0.9, "t2": s * 0.9},
            "objective": {"mean_normalized_accuracy": s, "mean_accuracy": 0.9 * s},
        }
        for i, s in enumerate(scores)
    ]


@pytest.fixture
def store(tmp_path: Path) -> FsspecStore:
    store = open_store(f"file://{tmp_path}/store")
    nights = [
        ("20250101-020000-aaaaaa", "nightly", 0.80, True, "first run"),
        ("20250102-020000-bbbbbb", "other", 0.70, True, "first run"),
        ("20250103-020000-cccccc", "nightly", 0.78, False, "new data digest"),
        ("20250104-020000-dddddd", "nightly", 0.85, True, None),
    ]
    for run_id, name, score, champion, rebuilt in nights:
        write_candidates(
            store, run_id, "mean_normalized_accuracy", "task_arithmetic-1", rows([0.6, score, 0.7])
        )
        write_summary(store, run_id, make_summary(run_id, name, score, champion, rebuilt))
    store.put("runs/20250105-020000-eeeeee/candidates.json", b"{}")  # crashed before its summary
    return store


def test_runs_lists_every_run_oldest_first(store: FsspecStore) -> None:
    listed = list_runs(store)
    assert [row["run_id"][:8] for row in listed] == [
        "20250101",
        "20250102",
        "20250103",
        "20250104",
        "20250105",
    ]
    first, _, third, fourth, crashed = listed
    assert first["started"] == "2025-01-01T02:00:00Z"
    assert first["pipeline"] == "nightly" and first["status"] == "succeeded"
    assert first["best"] == "task_arithmetic λ=0.4"
    assert first["objective_value"] == pytest.approx(0.80)
    assert (first["promoted"], third["promoted"]) == (True, False)
    assert (third["rebuilt"], fourth["rebuilt"]) == (1, 0)
    assert crashed["status"].startswith("unfinished") and crashed["promoted"] is None
    assert [row["run_id"][:8] for row in list_runs(store, "nightly")] == [
        "20250101",
        "20250103",
        "20250104",
    ]


def test_runs_command_prints_json_and_a_table(store: FsspecStore, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["runs", "--store", store.uri, "--json", "--name", "other"])
    assert result.exit_code == 0, result.output
    assert [row["run_id"] for row in json.loads(result.output)] == ["20250102-020000-bbbbbb"]
    table = runner.invoke(app, ["runs", "--store", store.uri], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "20250103-020000-cccccc" in table.output
    bad = runner.invoke(app, ["runs", "--store", "ftp://nowhere"])
    assert isinstance(bad.exception, SpecError) and "--store" in str(bad.exception)


def test_runs_tells_a_corrupt_summary_from_an_unfinished_run(store: FsspecStore) -> None:
    store.put("runs/20250106-020000-ffffff/summary.json", b'{"run_id": "20250106-02')
    store.put("runs/20250107-020000-gggggg/summary.json", b'{"status": "succeeded"}')
    statuses = {row["run_id"]: row["status"] for row in list_runs(store)}
    assert statuses["20250105-020000-eeeeee"] == "unfinished (no summary)"
    assert statuses["20250106-020000-ffffff"].startswith("corrupt summary")
    assert statuses["20250107-020000-gggggg"].startswith("corrupt summary")


def test_runs_table_is_whole_without_a_terminal(store: FsspecStore) -> None:
    """cron, CI and ``kubectl logs`` have no terminal: no column may be cut to fit 80."""
    write_summary(
        store,
        "20250108-020000-hhhhhh",
        make_summary("20250108-020000-hhhhhh", "a-rather-long-pipeline-name", 0.9, True, None),
    )
    table = CliRunner().invoke(app, ["runs", "--store", store.uri], env={"COLUMNS": None})
    assert table.exit_code == 0, table.output
    assert "…" not in table.output
    assert "20250108-020000-hhhhhh" in table.output
    assert "a-rather-long-pipeline-name" in table.output
    assert "mean_normalized_accuracy 0.9000 (test)" in table.output


def test_report_writes_html_and_plots(store: FsspecStore, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["report", "20250103-020000-cccccc", "--store", store.uri, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    for name in ("score_vs_coefficient", "best_per_task", "task_accuracies", "history"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
        assert f'src="{name}.png"' in page
    assert "new data digest" in page and "cache hit" in page
    assert "&lt;b&gt;no champion yet&lt;/b&gt;" in page  # escaped, never raw HTML
    assert "runs of this pipeline so far</th><td>2<" in page  # nightly runs up to this one


def test_report_without_candidates_still_writes_the_other_plots(
    store: FsspecStore, tmp_path: Path
) -> None:
    store.delete("runs/20250104-020000-dddddd/candidates.json")
    page = write_report(store, "20250104-020000-dddddd", tmp_path / "r")
    text = page.read_text()
    assert "no candidate list" in text
    assert not (tmp_path / "r" / "score_vs_coefficient.png").exists()
    assert (tmp_path / "r" / "history.png").read_bytes()[:8] == PNG


def test_report_of_an_unknown_or_unsafe_run_is_a_user_error(
    store: FsspecStore, tmp_path: Path
) -> None:
    with pytest.raises(ArtifactError, match="has no summary in this store"):
        write_report(store, "20990101-000000-ffffff", tmp_path / "r")
    with pytest.raises(ArtifactError, match="is not a run id"):
        write_report(store, "../../etc", tmp_path / "r")


def test_history_marks_champions_and_skips_runs_without_the_objective() -> None:
    runs = [
        make_summary(f"2025010{i}-000000-aaaaaa", "n", 0.7 + i / 100, i == 2, None)
        for i in range(1, 4)
    ]
    del runs[0]["best"]["test"]["mean_normalized_accuracy"]  # e.g. a negation run
    points = history_points(runs)
    assert [p["champion"] for p in points] == [True, False]
    assert points[0]["per_task"]["t1"] == pytest.approx(0.9 * 0.72 / 0.9)


def test_describe_candidate_shows_params_and_per_task_ranges() -> None:
    best = {"method": "ties", "params": {"density": 0.2}, "coefficients": {"a": 0.3, "b": 0.7}}
    assert describe_candidate(best) == 'ties {"density": 0.2} λ=0.3..0.7'
    assert describe_candidate({}) is None

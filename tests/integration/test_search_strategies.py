"""Search strategies through ``run_pipeline`` on a real local Ray: successive halving under a
row budget, Bayesian per-task coefficients, the champion's warm start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from pipelines.stages.datasets import load_dataset

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]

EVALUATION = {"val_fraction": 0.1, "val_max": 5000, "split_seed": 0}


def _run(document: dict, tmp_path: Path) -> dict:
    return run_pipeline(validate_document(document), Console(file=open("/dev/null", "w")))


def _candidates(spec: dict, summary: dict) -> dict:
    store = Path(spec["storage"]["uri"].removeprefix("file://"))
    return json.loads((store / "runs" / summary["run_id"] / "candidates.json").read_text())


def test_successive_halving_finds_the_planted_best_within_its_row_budget(
    tiny_spec: dict, tmp_path: Path
) -> None:
    # 26 coefficients that subtract the task vectors (worse than zero-shot) and one that adds
    # them: the planted best, which halving must keep through every rung.
    bad = [round(-3.0 + 0.1 * i, 1) for i in range(26)]
    tiny_spec["merge"]["candidates"] = [
        {"method": "task_arithmetic", "coefficient": {"values": [*bad, 0.5]}}
    ]
    val_rows = sum(
        len(load_dataset(task["dataset"], EVALUATION, "t").y_val) for task in tiny_spec["tasks"]
    )
    full_grid = 27 * val_rows
    budget = full_grid // 4
    tiny_spec["merge"]["search"] = {"strategy": "successive_halving", "budget": budget}
    summary = _run(tiny_spec, tmp_path)

    assert summary["best"]["coefficients"] == {"perm1": 0.5, "perm2": 0.5}
    search = summary["search"]
    assert search["strategy"] == "successive_halving"
    assert search["rows_full_grid"] == full_grid
    assert [rung["candidates"] for rung in search["rungs"]] == [27, 9, 3]
    document = _candidates(tiny_spec, summary)
    rows = document["rows"]
    assert len(rows) == 27 and summary["search"]["candidates_evaluated"] == 27
    scored = sum(step["rows"] for row in rows for step in row["rungs"])
    assert scored == search["rows_scored"] <= budget
    assert sorted(len(row["rungs"]) for row in rows) == [1] * 18 + [2] * 6 + [3] * 3
    best = next(row for row in rows if row["id"] == document["best_id"])
    assert best["full_split"] and best["rungs"][-1]["rows"] == val_rows
    assert best["objective"]["mean_normalized_accuracy"] == best["rungs"][-1]["objective"]


def test_bayesian_per_task_coefficients_in_standard_mode_respect_the_candidate_budget(
    tiny_spec: dict, tmp_path: Path
) -> None:
    tiny_spec["merge"]["candidates"][0]["coefficient"] = {"start": 0.2, "stop": 0.8, "num": 4}
    tiny_spec["merge"]["search"] = {"per_task": True, "strategy": "bayesian", "budget": 6}
    summary = _run(tiny_spec, tmp_path)
    assert summary["search"]["strategy"] == "bayesian"
    assert summary["search"]["candidates_evaluated"] == 6
    rows = _candidates(tiny_spec, summary)["rows"]
    coefficients = [row["coefficient"] for row in rows]
    assert len({json.dumps(c, sort_keys=True) for c in coefficients}) == 6
    assert all(0.2 <= v <= 0.8 for c in coefficients for v in c.values())
    assert all(row["scored_by"] == "forward" for row in rows)
    best = min(  # highest objective, ties to the smaller coefficient norm
        rows,
        key=lambda row: (
            -round(row["objective"]["mean_normalized_accuracy"], 12),
            sum(v * v for v in row["coefficient"].values()),
        ),
    )
    assert summary["best"]["coefficients"] == best["coefficient"]


def test_warm_start_scores_the_champion_through_every_halving_rung(
    tiny_spec: dict, tmp_path: Path
) -> None:
    tiny_spec["merge"]["candidates"][0]["coefficient"] = {"values": [0.5]}
    tiny_spec["merge"]["search"] = {"warm_start": "champion"}
    first = _run(tiny_spec, tmp_path)  # no champion yet: nothing added, then promoted
    assert first["search"]["warm_start"]["champion_version"] is None
    assert "no champion" in first["search"]["warm_start"]["reason"]
    assert first["search"]["candidates_evaluated"] == 1
    assert first["model"]["promotion"]["promoted"] is True

    # The second night's grid only subtracts the task vectors: every one of its candidates is
    # worse than the champion's, which halving must keep to the full split.
    bad = [round(-1.0 + 0.1 * i, 1) for i in range(9)]
    tiny_spec["merge"]["candidates"][0]["coefficient"] = {"values": bad}
    tiny_spec["merge"]["search"] |= {"strategy": "successive_halving", "eta": 3}
    second = _run(tiny_spec, tmp_path)
    warm = second["search"]["warm_start"]
    assert warm["champion_version"] == first["model"]["version"]
    assert second["search"]["candidates_evaluated"] == 10
    rows = _candidates(tiny_spec, second)["rows"]
    champion = [row for row in rows if row.get("warm_start") == "champion"]
    assert len(champion) == 1 and champion[0]["id"] == warm["candidate"]
    assert champion[0]["coefficient"] == 0.5
    assert champion[0]["full_split"] and len(champion[0]["rungs"]) == 3
    assert second["best"]["coefficients"] == {"perm1": 0.5, "perm2": 0.5}
    assert first["best"]["val"] == second["best"]["val"]  # the same candidate, the same data

"""Linear mode, the fast path, per-task search, the surrogate and negation on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from pipelines.stages.datasets import load_dataset
from storage.objectstore import open_store
from storage.taskvectors import read_task_vector
from tests.conftest import BEST_KEYS, SUMMARY_KEYS
from workers.finetune import delta_between, linearized_forward, unpack_linearized
from workers.merge import merge
from workers.models import apply_head, build_backbone
from workers.search.evaluate import features_at

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]
EVALUATION = {"val_fraction": 0.1, "val_max": 5000, "split_seed": 0}


def _run(document: dict, tmp_path: Path, name: str) -> dict:
    return run_pipeline(
        validate_document(document), Console(file=open("/dev/null", "w")), tmp_path / name
    )


def _linear(spec: dict, **merge: object) -> dict:
    document = json.loads(json.dumps(spec))
    document["finetune"]["mode"] = "linear"
    document["merge"] |= merge
    return document


def test_a_linear_merge_is_served_as_the_linearized_model_the_search_scored(
    tiny_spec: dict, tmp_path: Path
) -> None:
    import mlflow

    tiny_spec["tracking"]["registered_model"] = "tiny-linear"
    summary = _run(_linear(tiny_spec), tmp_path, "linear.json")
    assert set(summary) == SUMMARY_KEYS and set(summary["best"]) == BEST_KEYS
    assert summary["mode"] == "linear"
    assert summary["search"]["strategy"] == "coordinate_ascent"
    assert summary["search"]["per_task"] is True and summary["search"]["fast_path"] is True
    assert set(summary["best"]["coefficients"]) == {"perm1", "perm2"}
    for task in summary["tasks"].values():
        manifest = Path(task["task_vector_uri"].removeprefix("file://"), "manifest.json")
        assert json.loads(manifest.read_text())["meta"]["mode"] == "linear"
        assert task["finetuned"]["val"] > task["zero_shot"]["val"]

    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    assert json.loads((model_dir / "config.json").read_text())["mode"] == "linear"
    names = set(load_file(str(model_dir / "model.safetensors")))
    assert {n.split(".", 1)[0] for n in names} == {"base", "delta", "heads"}

    # What the search evaluated: θ0 + J f(x; θ0)·Σ α_t τ_t, rebuilt from the stored task vectors.
    store = open_store(tiny_spec["storage"]["uri"])
    vectors, heads = {}, {}
    for task, info in summary["tasks"].items():
        key = info["task_vector_uri"].rstrip("/").rsplit("/", 1)[1]
        vectors[task], heads[task] = read_task_vector(store, key)
    theta0, _ = unpack_linearized(
        {
            k: v
            for k, v in load_file(str(model_dir / "model.safetensors")).items()
            if "heads." not in k
        }
    )
    merged = merge("task_arithmetic", theta0, vectors, summary["best"]["coefficients"])
    backbone = build_backbone(tiny_spec["base_model"], 64)

    mlflow.set_tracking_uri(tiny_spec["tracking"]["uri"])
    model = mlflow.pyfunc.load_model(f"models:/tiny-linear/{summary['model']['version']}")
    val_accuracy, nonlinear_differs = [], 0
    for index, task in enumerate(("perm1", "perm2")):
        data = load_dataset(tiny_spec["tasks"][index]["dataset"], EVALUATION, task)
        x = torch.from_numpy(data.x_test)
        served = np.asarray(model.predict(data.x_test, params={"task": task}))
        with torch.no_grad():
            linear = linearized_forward(backbone, theta0, delta_between(merged, theta0), x)
            nonlinear = features_at(backbone, merged, x)
        assert np.array_equal(served, apply_head(heads[task], linear).argmax(1).numpy())
        nonlinear_differs += int(
            (served != apply_head(heads[task], nonlinear).argmax(1).numpy()).sum()
        )
        assert float((served == data.y_test).mean()) == pytest.approx(
            summary["best"]["test"]["per_task"][task], abs=1e-12
        )
        val = model.predict(data.x_val, params={"task": task})
        val_accuracy.append(float((np.asarray(val) == data.y_val).mean()))
    assert nonlinear_differs > 0  # serving θ0 + τ through the network itself would be caught
    # The search scored the validation split on the fast path; serving runs the jvp forward.
    assert np.mean(val_accuracy) == pytest.approx(
        summary["best"]["val"]["mean_accuracy"], abs=1e-12
    )


def test_the_fast_path_and_forward_passes_choose_the_same_candidate(
    tiny_spec: dict, tmp_path: Path
) -> None:
    grid = {"search": {"per_task": False}}
    fast = _run(_linear(tiny_spec, **grid), tmp_path, "fast.json")
    slow = _run(_linear(tiny_spec, fast_path="off", **grid), tmp_path, "slow.json")
    assert all(task["cache_hit"] for task in slow["tasks"].values())
    assert (fast["search"]["fast_path"], slow["search"]["fast_path"]) == (True, False)
    assert fast["search"]["candidates_evaluated"] == slow["search"]["candidates_evaluated"] == 5
    assert fast["best"]["coefficients"] == slow["best"]["coefficients"]
    assert fast["best"]["val"] == slow["best"]["val"]
    assert fast["best"]["test"] == slow["best"]["test"]

    per_task = {"search": {"per_task": True, "budget": 12}}
    exact = _run(_linear(tiny_spec, **per_task), tmp_path, "exact.json")
    forward = _run(_linear(tiny_spec, fast_path="off", **per_task), tmp_path, "forward.json")
    assert exact["search"]["candidates_evaluated"] == forward["search"]["candidates_evaluated"]
    assert exact["search"]["candidates_evaluated"] <= 12
    assert exact["best"]["coefficients"] == forward["best"]["coefficients"]
    assert exact["best"]["val"] == forward["best"]["val"]
    assert (
        exact["best"]["val"]["mean_normalized_accuracy"]
        >= (fast["best"]["val"]["mean_normalized_accuracy"])
    )


def test_the_posthoc_surrogate_verifies_only_its_top_candidates(
    tiny_spec: dict, tmp_path: Path
) -> None:
    reference = _run(tiny_spec, tmp_path, "grid.json")
    tiny_spec["merge"]["search"] = {"surrogate": "posthoc_linear", "verify_top": 5}
    everything = _run(tiny_spec, tmp_path, "all.json")
    tiny_spec["merge"]["search"]["verify_top"] = 2
    top_two = _run(tiny_spec, tmp_path, "two.json")
    for summary, verified in ((everything, 5), (top_two, 2)):
        search = summary["search"]
        assert summary["mode"] == "standard" and search["surrogate"] == "posthoc_linear"
        assert search["candidates_evaluated"] == 5 and search["verified"] == verified
        assert search["surrogate_best_is_verified_best"] == (
            search["surrogate_best"] == search["verified_best"]
        )
    # Verifying every candidate is the plain grid search: same choice, same real scores.
    assert everything["best"]["coefficients"] == reference["best"]["coefficients"]
    assert everything["best"]["val"] == reference["best"]["val"]
    objective = "mean_normalized_accuracy"
    assert top_two["best"]["val"][objective] <= reference["best"]["val"][objective]


def test_negation_forgets_the_target_and_keeps_the_control(tiny_spec: dict, tmp_path: Path) -> None:
    document = _linear(
        tiny_spec,
        objective="negate",
        negate={"target": "perm1", "control": "perm2"},
        candidates=[
            {"method": "task_arithmetic", "coefficient": {"start": 0.0, "stop": 2.0, "num": 9}}
        ],
    )
    summary = _run(document, tmp_path, "negate.json")
    best = summary["best"]
    assert best["coefficients"]["perm2"] == 0.0 and best["coefficients"]["perm1"] <= 0.0
    assert best["val"]["control_retention"] >= 0.95
    zero_shot = summary["tasks"]["perm1"]["zero_shot"]["val"]
    assert best["val"]["target_accuracy"] < zero_shot  # α = 0 is feasible: it must do better
    assert best["test"]["negate"] == pytest.approx(1 - best["test"]["target_accuracy"])

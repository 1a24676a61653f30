"""Planning is pure: candidates, ids and cache keys."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.search.selection import choose_best, decide_promotion
from pipelines.spec.load import apply_overrides, validate_document
from pipelines.spec.plan import Candidate, make_plan, task_vector_key
from storage.errors import SpecError
from tests.conftest import REPO, TINY_SPEC

SLERP = "merge.candidates=[{method: slerp, coefficient: {values: [0.5]}}]"


def _plan(*overrides: str):
    return make_plan(validate_document(apply_overrides(TINY_SPEC, list(overrides))))


def test_candidates_expand_params_and_coefficients_with_stable_ids() -> None:
    plan = _plan(
        "merge.candidates=[{method: task_arithmetic, coefficient: {num: 3}},"
        " {method: ties, params: {density: [0.1, 0.2]}, coefficient: {values: [0.5, 1.0]}}]"
    )
    assert len(plan.candidates) == 3 + 2 * 2
    again = _plan(
        "merge.candidates=[{method: task_arithmetic, coefficient: {num: 3}},"
        " {method: ties, params: {density: [0.1, 0.2]}, coefficient: {values: [0.5, 1.0]}}]"
    )
    assert [c.id for c in plan.candidates] == [c.id for c in again.candidates]
    assert len({c.id for c in plan.candidates}) == len(plan.candidates)
    assert {tuple(c.params.items()) for c in plan.candidates if c.method == "ties"} == {
        (("density", 0.1),),
        (("density", 0.2),),
    }


def test_planning_does_not_need_ray() -> None:
    code = (
        "import sys; from pipelines.spec.plan import make_plan; "
        "from pipelines.spec.load import validate_document; from tests.conftest import TINY_SPEC; "
        "plan = make_plan(validate_document(TINY_SPEC)); "
        "print(len(plan.candidates), 'ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5", "False"]


def test_task_vector_key_depends_on_inputs_not_resources() -> None:
    finetune = _plan().finetune
    key = task_vector_key("base", "data", finetune)
    assert key == task_vector_key("base", "data", finetune)
    assert key != task_vector_key("base2", "data", finetune)
    assert key != task_vector_key("base", "data2", finetune)
    assert key != task_vector_key("base", "data", finetune | {"steps": finetune["steps"] + 1})
    moved = finetune | {"resources": {"num_gpus": 1, "num_cpus": 4, "num_workers": 2}}
    assert key == task_vector_key("base", "data", moved)


def test_best_candidate_ties_break_on_coefficient_norm_then_method() -> None:
    a, b, c = (
        Candidate("ties", {}, 0.6),
        Candidate("task_arithmetic", {}, 0.6),
        Candidate("task_arithmetic", {}, 0.3),
    )
    scores = {x.id: {"mean_normalized_accuracy": 0.9} for x in (a, b, c)}
    assert choose_best([a, b, c], scores, "mean_normalized_accuracy") == c
    assert choose_best([a, b], scores, "mean_normalized_accuracy") == b
    scores[a.id] = {"mean_normalized_accuracy": 0.95}
    assert choose_best([a, b, c], scores, "mean_normalized_accuracy") == a


def test_promotion_needs_a_strictly_better_score_on_the_same_tasks() -> None:
    objective = "mean_normalized_accuracy"
    champion = {"mergeline.tasks": "a,b", "mergeline.test_objective": "0.800000"}
    assert decide_promotion(0.9, objective, "a,b", None)[0]
    assert decide_promotion(0.81, objective, "a,b", champion)[0]
    promote, reason = decide_promotion(0.8, objective, "a,b", champion)
    assert not promote and "does not beat" in reason
    promote, reason = decide_promotion(0.99, objective, "a,b,c", champion)  # not comparable
    assert not promote and "a,b" in reason


def test_methods_that_ignore_the_coefficient_get_one_point() -> None:
    plan = _plan(
        "merge.candidates=[{method: model_stock, coefficient: {num: 5}},"
        " {method: tall_masks, coefficient: {num: 5}},"
        " {method: task_arithmetic, coefficient: {num: 5}}]"
    )
    by_method: dict[str, list[Candidate]] = {}
    for candidate in plan.candidates:
        by_method.setdefault(candidate.method, []).append(candidate)
    assert [c.coefficient for c in by_method["model_stock"]] == [1.0]
    # tall_masks searches its λ_t grid instead, each at coefficient 1
    assert [(c.params["lam"], c.coefficient) for c in by_method["tall_masks"]] == [
        (lam, 1.0) for lam in (0.2, 0.3, 0.4, 0.5, 0.6)
    ]
    assert [c.coefficient for c in by_method["task_arithmetic"]] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_candidate_refuses_a_task_count_its_method_cannot_merge() -> None:
    three = {"name": "perm3", "dataset": TINY_SPEC["tasks"][0]["dataset"]}
    with pytest.raises(SpecError, match=r"'slerp' takes exactly 2 task vectors, got 3"):
        validate_document(
            apply_overrides(TINY_SPEC | {"tasks": [*TINY_SPEC["tasks"], three]}, [SLERP])
        )
    assert {c.method for c in _plan(SLERP).candidates} == {"slerp"}

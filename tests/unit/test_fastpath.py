"""The exact fast path against real linearized forward passes, and the search strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.search.selection import choose_best, objective_scores
from pipelines.spec.plan import Candidate
from storage.errors import MergeInputError, SpecError
from workers.finetune import LinearizedModel, TrainConfig, delta_between, linearized_forward, train
from workers.merge import merge
from workers.models import apply_head, build_backbone, fit_linear_probe
from workers.search.evaluate import features_at, linearized_accuracy
from workers.search.fastpath import build_fast_path, linear_weights
from workers.search.strategies import best_point, coordinate_ascent, full_grid

CONFIG = {"source": "builtin", "name": "mlp", "hidden": [32], "features": 6, "seed": 0}
TASKS = ("a", "b", "c")


@pytest.fixture(scope="module")
def linear_tasks() -> dict:
    """Three small tasks fine-tuned in linear mode on one base: θ0, τ_t, heads, val splits."""
    backbone = build_backbone(CONFIG, 8)
    theta0 = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    rng = np.random.default_rng(0)
    vectors, heads, inputs, labels = {}, {}, {}, {}
    for index, task in enumerate(TASKS):
        x = rng.normal(size=(300, 8)).astype(np.float32)
        y = ((x[:, index] - x[:, index + 3] + 0.5 * x[:, 7] ** 2) > 0.3).astype(np.int64)
        head = fit_linear_probe(features_at(backbone, theta0, x[:200]).numpy(), y[:200], 2)
        model = LinearizedModel(build_backbone(CONFIG, 8), theta0)
        train(model, head, x[:200], y[:200], TrainConfig(120, 32, 1e-2, seed=index), task)
        vectors[task], heads[task] = model.task_vector(), head
        inputs[task], labels[task] = torch.from_numpy(x[200:]), torch.from_numpy(y[200:])
    return {
        "backbone": backbone,
        "theta0": theta0,
        "vectors": vectors,
        "heads": heads,
        "inputs": inputs,
        "labels": labels,
    }


def _fast(data: dict):
    return build_fast_path(
        data["backbone"],
        data["theta0"],
        data["vectors"],
        data["heads"],
        data["inputs"],
        data["labels"],
    )


def _real_logits(data: dict, method: str, coefficient, task: str) -> torch.Tensor:
    merged = merge(method, data["theta0"], data["vectors"], coefficient)
    delta = delta_between(merged, data["theta0"])
    features = linearized_forward(data["backbone"], data["theta0"], delta, data["inputs"][task])
    return apply_head(data["heads"][task], features)


def test_fast_path_logits_equal_a_real_linearized_forward(linear_tasks: dict) -> None:
    fast = _fast(linear_tasks)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        values = (torch.rand(len(TASKS), generator=generator) * 3 - 1).tolist()
        coefficients = dict(zip(TASKS, values, strict=True))
        weights = linear_weights("task_arithmetic", {}, coefficients, fast.sources)
        for task in TASKS:
            got = fast.logits(torch.tensor([weights]), task)[0]
            want = _real_logits(linear_tasks, "task_arithmetic", coefficients, task)
            assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    for lam in (0.4, 1.3):  # weight_average: α_s = λ / T
        weights = linear_weights("weight_average", {}, lam, fast.sources)
        got = fast.logits(torch.tensor([weights]), "b")[0]
        want = _real_logits(linear_tasks, "weight_average", lam, "b")
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_only_methods_linear_in_the_task_vectors_have_weights() -> None:
    assert linear_weights("task_arithmetic", {}, 0.5, TASKS) == [0.5, 0.5, 0.5]
    assert linear_weights("task_arithmetic", {}, {"a": 1.0, "b": 0, "c": -2.0}, TASKS) == [
        1.0,
        0.0,
        -2.0,
    ]
    assert linear_weights("weight_average", {}, 0.9, TASKS) == pytest.approx([0.3] * 3)
    assert linear_weights("ties", {}, 0.5, TASKS) is None
    assert linear_weights("dare", {"p": 0.1}, 0.5, TASKS) is None


def test_the_grid_search_picks_the_same_candidate_with_the_same_scores(
    linear_tasks: dict,
) -> None:
    fast = _fast(linear_tasks)
    finetuned = {
        t: linearized_accuracy(
            linear_tasks["backbone"],
            linear_tasks["theta0"],
            linear_tasks["vectors"][t],
            linear_tasks["heads"][t],
            linear_tasks["inputs"][t],
            linear_tasks["labels"][t],
        )
        for t in TASKS
    }
    grid = [round(0.1 * i, 10) for i in range(16)]
    candidates = [Candidate("task_arithmetic", {}, lam) for lam in grid]
    weights = torch.tensor([linear_weights(c.method, {}, c.coefficient, TASKS) for c in candidates])
    fast_accuracy = fast.accuracies(weights)
    fast_scores, real_scores = {}, {}
    for index, candidate in enumerate(candidates):
        merged = merge(
            "task_arithmetic", linear_tasks["theta0"], linear_tasks["vectors"], grid[index]
        )
        delta = delta_between(merged, linear_tasks["theta0"])
        real = {
            t: linearized_accuracy(
                linear_tasks["backbone"],
                linear_tasks["theta0"],
                delta,
                linear_tasks["heads"][t],
                linear_tasks["inputs"][t],
                linear_tasks["labels"][t],
            )
            for t in TASKS
        }
        assert {t: float(fast_accuracy[t][index]) for t in TASKS} == real
        fast_scores[candidate.id] = objective_scores(
            {t: float(fast_accuracy[t][index]) for t in TASKS}, finetuned
        )
        real_scores[candidate.id] = objective_scores(real, finetuned)
    objective = "mean_normalized_accuracy"
    best_fast = choose_best(candidates, fast_scores, objective)
    assert best_fast == choose_best(candidates, real_scores, objective)
    assert fast_scores == real_scores
    assert best_fast.coefficient not in (0.0, grid[-1])  # an interior optimum: a real choice


def _bowl(points: list[tuple[float, ...]]) -> list[float]:
    target = (0.3, 0.7, 0.5)
    return [-sum((p - t) ** 2 for p, t in zip(point, target, strict=True)) for point in points]


def test_coordinate_ascent_finds_a_separable_optimum_within_its_budget() -> None:
    grid = [round(0.1 * i, 10) for i in range(11)]
    scores = coordinate_ascent(_bowl, 3, grid)
    assert best_point(scores) == (0.3, 0.7, 0.5)
    assert len(scores) < len(grid) ** 3 / 10  # it did not enumerate the cube
    limited = coordinate_ascent(_bowl, 3, grid, budget=15)
    assert len(limited) == 15
    assert coordinate_ascent(_bowl, 3, grid) == scores  # deterministic


# Per-task accuracy (percent) of three tasks at each α_t of the grid [0, 0.5, 1, 1.5, 2]; each
# task's accuracy depends on its own coefficient only, as with disentangled task vectors.
PER_TASK_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)
PER_TASK_ACCURACY = (
    (50, 80, 70, 60, 55),  # a: best at 0.5
    (40, 45, 60, 75, 70),  # b: best at 1.5
    (30, 50, 90, 65, 35),  # c: best at 1.0
)


def _summed_accuracy(points: list[tuple[float, ...]]) -> list[float]:
    """3 × the mean accuracy of each point: exact integers, so ranks are exact."""
    return [
        float(sum(row[PER_TASK_GRID.index(v)] for row, v in zip(PER_TASK_ACCURACY, p, strict=True)))
        for p in points
    ]


def test_coordinate_ascent_finds_the_per_task_optimum_above_the_shared_one() -> None:
    # shared α: sums 120, 175, 220, 200, 160 -> the best shared point is (1, 1, 1) at 220.
    # The ascent starts there; sweeping a with b = c = 1: 200, 230, 220, 210, 205 -> a = 0.5;
    # then b with (0.5, ·, 1): 210, 215, 230, 245, 240 -> b = 1.5; then c: 90 is c's best at
    # 1.0 -> stays. The next pass moves nothing: (0.5, 1.5, 1.0) at 80 + 75 + 90 = 245 > 220.
    scores = coordinate_ascent(_summed_accuracy, 3, list(PER_TASK_GRID))
    shared = max(_summed_accuracy([(v, v, v) for v in PER_TASK_GRID]))
    assert shared == 220.0
    best = best_point(scores)
    assert best == (0.5, 1.5, 1.0)
    assert scores[best] == 245.0 > shared


def test_per_task_search_on_the_fast_path_scores_its_points_exactly(linear_tasks: dict) -> None:
    fast = _fast(linear_tasks)

    def evaluate(points):
        accuracy = fast.accuracies(torch.tensor(points))
        return torch.stack([accuracy[t] for t in TASKS], dim=1).mean(dim=1).tolist()

    scores = coordinate_ascent(evaluate, 3, [round(0.1 * i, 10) for i in range(21)])
    best = best_point(scores)
    assert evaluate([best]) == [scores[best]]


def test_a_full_per_task_grid_over_the_budget_is_refused() -> None:
    with pytest.raises(SpecError, match=r"21\^3 = 9261.*coordinate_ascent"):
        full_grid(_bowl, 3, [0.05 * i for i in range(21)], budget=1000)
    assert len(full_grid(_bowl, 3, [0.0, 0.5, 1.0])) == 27


def _merge_refusal(coefficient: dict) -> str:
    """merge()'s own message for this coefficient dict over one-tensor tasks a and b."""
    base = {"w": torch.zeros(2)}
    vectors = {"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(2)}}
    with pytest.raises(MergeInputError) as refused:
        merge("task_arithmetic", base, vectors, coefficient)
    return str(refused.value)


@pytest.mark.parametrize(
    "coefficient",
    [{"a": 0.5}, {"b": 0.25}, {"a": 0.5, "b": 0.25, "d": 1.0}, {"a": 0.5, "b": float("nan")}],
    ids=["no-b", "no-a", "unknown-d", "nan"],
)
def test_a_bad_coefficient_dict_is_refused_as_merge_refuses_it(coefficient: dict) -> None:
    # a task left out would otherwise weigh 0: {"a": 0.5} would score θ0 + 0.5 τ_a
    expected = _merge_refusal(coefficient)
    with pytest.raises(MergeInputError) as refused:
        linear_weights("task_arithmetic", {}, coefficient, ["a", "b"])
    assert str(refused.value) == expected
    assert linear_weights("task_arithmetic", {}, {"b": 0.25, "a": 0.5}, ["a", "b"]) == [0.5, 0.25]


def test_the_missing_coefficient_message_says_how_to_leave_a_task_out() -> None:
    assert _merge_refusal({"a": 0.5}) == (
        "the coefficients have no value for task 'b': give one per task vector "
        "(0.0 leaves a task out)"
    )

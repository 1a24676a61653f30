"""model_stock and slerp against hand-computed examples (MERGING.md, "Second wave")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge import merge
from workers.merge.engine import plan_merge, specs_of


def t(*values: float, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor(values, dtype=dtype)


def vectors(**tasks: Tensor) -> dict[str, dict[str, Tensor]]:
    """One-tensor task vectors named 'x'."""
    return {task: {"x": value} for task, value in tasks.items()}


def merged_x(method: str, base: Tensor, tasks: dict, coefficient=1.0, **params) -> Tensor:
    return merge(method, {"x": base}, tasks, coefficient, **params)["x"]


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-6) -> None:
    assert torch.allclose(actual, expected.to(actual.dtype), rtol=0, atol=atol), (
        f"{actual} != {expected}"
    )


SQRT2, SQRT3 = math.sqrt(2), math.sqrt(3)

# ---------------------------------------------------------------------------- model_stock


def test_model_stock_two_tasks_at_a_known_angle():
    # cos(τa, τb) = (3·4 + 4·3) / (5 · 5) = 24/25; t = 2 · 24/25 / (1 + 24/25) = 48/49;
    # mean τ = [3.5, 3.5]; θ = [1, -1] + 48/49 · 3.5 = [1 + 24/7, -1 + 24/7]
    result = merged_x("model_stock", t(1, -1), vectors(a=t(3, 4), b=t(4, 3)))
    assert_close(result, t(1 + 24 / 7, -1 + 24 / 7))


def test_model_stock_three_tasks_use_the_mean_pairwise_cosine():
    # cos(a, b) = 0, cos(a, c) = cos(b, c) = 1/√2: mean cos φ = √2/3;
    # t = 3 · √2/3 / (1 + 2 · √2/3) = 3√2 / (3 + 2√2); mean τ = [2/3, 2/3]
    ratio = 3 * SQRT2 / (3 + 2 * SQRT2)
    result = merged_x("model_stock", torch.zeros(2), vectors(a=t(1, 0), b=t(0, 1), c=t(1, 1)))
    assert_close(result, t(ratio * 2 / 3, ratio * 2 / 3))


def test_model_stock_is_per_tensor():
    # "w" holds the 24/25 pair (t = 48/49); the 0-D "s" has cos 1, so t = 1: θ0 + mean τ
    base = {"w": torch.zeros(2, 1), "s": torch.tensor(1.0)}
    tasks = {
        "a": {"w": torch.tensor([[3.0], [4.0]]), "s": torch.tensor(2.0)},
        "b": {"w": torch.tensor([[4.0], [3.0]]), "s": torch.tensor(3.0)},
    }
    result = merge("model_stock", base, tasks)
    assert_close(result["w"], torch.tensor([[24 / 7], [24 / 7]]))
    assert_close(result["s"], torch.tensor(1 + 2.5))


def test_model_stock_identical_task_vectors_give_that_model():
    tau = t(0.5, -2, 3)
    result = merged_x("model_stock", t(1, 1, 1), vectors(a=tau, b=tau.clone(), c=tau.clone()))
    assert_close(result, t(1.5, -1, 4))  # cos = 1 -> t = 3 / (1 + 2) = 1


@pytest.mark.parametrize(
    "tasks",
    [
        vectors(a=t(1, 0), b=t(0, 1)),  # orthogonal: cos 0 -> t = 0
        vectors(a=t(1, 2), b=t(-2, -4)),  # antiparallel: the formula's pole (−2/0)
        vectors(a=t(1, 2), b=t(-2, 1), c=t(-1, -1)),  # negative mean cosine
        vectors(a=t(1, 2), b=t(0, 0)),  # a zero task vector: cos 0
        vectors(a=t(0, 0), b=t(0, 0)),
    ],
    ids=["orthogonal", "antiparallel", "negative", "one-zero", "all-zero"],
)
def test_model_stock_without_a_shared_direction_gives_base_exactly(tasks):
    base = t(0.25, -3)
    assert torch.equal(merged_x("model_stock", base, tasks), base)


def test_model_stock_refuses_one_task():
    with pytest.raises(MergeInputError, match="'model_stock' takes at least 2 task vectors, got 1"):
        merged_x("model_stock", torch.zeros(2), vectors(a=t(1, 0)))


# ---------------------------------------------------------------------------------- slerp


@pytest.mark.parametrize(
    ("factor", "expected"),
    [
        (0.5, (SQRT2 / 2, SQRT2 / 2)),  # sin(π/4) / sin(π/2) for both
        (1 / 3, (SQRT3 / 2, 0.5)),  # sin(π/3), sin(π/6)
        (0.0, (1.0, 0.0)),
        (1.0, (0.0, 1.0)),
    ],
)
def test_slerp_between_orthogonal_unit_models(factor, expected):
    # θ_1 = [1, 1] + [0, -1] = [1, 0], θ_2 = [1, 1] + [-1, 0] = [0, 1]: ω = π/2, sin ω = 1.
    # (Slerping the task vectors instead would give [1, 1] + [-1/2, -√3/2] at t = 1/3.)
    result = merged_x("slerp", t(1, 1), vectors(a=t(0, -1), b=t(-1, 0)), factor)
    assert_close(result, t(*expected))


def test_slerp_at_sixty_degrees_and_unequal_lengths():
    # θ_1 = [1, 0], θ_2 = [1/2, √3/2]: ω = π/3, both weights sin(π/6) / sin(π/3) = 1/√3,
    # so θ = (θ_1 + θ_2) / √3 = [√3/2, 1/2], the unit vector at 30°
    result = merged_x("slerp", torch.zeros(2), vectors(a=t(1, 0), b=t(0.5, SQRT3 / 2)), 0.5)
    assert_close(result, t(SQRT3 / 2, 0.5))
    # the weights apply to the unnormalised tensors: [2, 0] and [0, 3] at t = 1/2
    result = merged_x("slerp", torch.zeros(2), vectors(a=t(2, 0), b=t(0, 3)), 0.5)
    assert_close(result, t(SQRT2, 1.5 * SQRT2))


def test_slerp_takes_tasks_in_sorted_name_order():
    # θ_1 is task 'a' whatever the dict order: t = 1/3 from [1, 0] towards [0, 1]
    result = merged_x("slerp", torch.zeros(2), {"z": {"x": t(0, 1)}, "a": {"x": t(1, 0)}}, 1 / 3)
    assert_close(result, t(SQRT3 / 2, 0.5))


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (t(2, 4), t(1.25, 2.5)),  # parallel: cos 1, (1 - 1/4) [1, 2] + 1/4 [2, 4]
        (t(-2, -4), t(0.25, 0.5)),  # antiparallel: |cos| = 1 as well
    ],
)
def test_slerp_of_colinear_models_is_linear(second, expected):
    result = merged_x("slerp", torch.zeros(2), vectors(a=t(1, 2), b=second), 0.25)
    assert_close(result, expected)


@pytest.mark.parametrize(("cosine", "linear"), [(0.9996, True), (0.9994, False)])
def test_slerp_colinearity_threshold(cosine, linear):
    # unit θ_1, θ_2 at cos ω: the linear midpoint has norm cos(ω/2) < 1, the spherical one 1
    first = t(1, 0, dtype=torch.float64)
    second = t(cosine, math.sqrt(1 - cosine**2), dtype=torch.float64)
    result = merged_x("slerp", torch.zeros(2, dtype=torch.float64), vectors(a=first, b=second), 0.5)
    half = math.acos(cosine) / 2
    expected = (
        (first + second) / 2 if linear else (first + second) * (math.sin(half) / math.sin(2 * half))
    )
    assert_close(result, expected, atol=1e-12)
    assert abs(float(result.norm()) - (math.cos(half) if linear else 1.0)) < 1e-12


@pytest.mark.parametrize("count", [1, 3])
def test_slerp_refuses_other_than_two_tasks(count):
    tasks = {name: {"x": t(1, 0)} for name in "abc"[:count]}
    message = f"merge method 'slerp' takes exactly 2 task vectors, got {count}"
    with pytest.raises(MergeInputError, match=message):
        merged_x("slerp", torch.zeros(2), tasks, 0.5)
    specs = specs_of({"x": torch.zeros(2)})
    with pytest.raises(MergeInputError, match=message):
        plan_merge("slerp", specs, dict.fromkeys(tasks, specs), 0.5)


def test_slerp_refuses_per_task_coefficients():
    with pytest.raises(MergeInputError, match="'slerp' takes one shared coefficient"):
        merged_x("slerp", torch.zeros(2), vectors(a=t(1, 0), b=t(0, 1)), {"a": 0.5, "b": 0.5})


def test_slerp_of_equal_tiny_models_is_that_model():
    # below the 1e-8 norm floor the directions stay unnormalised (cos ≈ 0), yet equal ends
    # must interpolate to themselves, not be scaled by 2 sin(π/4) = √2 as orthogonal ones would
    base = t(1e-10, -2e-10)
    result = merged_x("slerp", base, vectors(a=torch.zeros(2), b=torch.zeros(2)), 0.5)
    assert torch.equal(result, base)

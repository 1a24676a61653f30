"""model_stock against hand-computed examples (MERGING.md, "Second wave")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge import merge


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


SQRT2 = math.sqrt(2)

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

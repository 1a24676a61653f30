"""model_stock, slerp and della against hand-computed examples (MERGING.md, "Second wave")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge import merge
from workers.merge.della import drop_probabilities, magprune
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


# ---------------------------------------------------------------------------------- della


@pytest.mark.parametrize(
    ("tau", "density", "epsilon", "expected"),
    [
        # p = 0.4, ε = 0.2: ranks by |.| 0.1 < 0.5 < 1 < 2 < 3 -> positions 0, 1/4, .., 1;
        # p_i = 0.5 − 0.2 · position
        ((0.5, -3, 2, 1, -0.1), 0.6, 0.2, (0.45, 0.3, 0.35, 0.4, 0.5)),
        # ties: |±1| share ranks 1 and 2 -> 1.5, position 1/2; 0 is the smallest
        ((1, -1, 2, 0), 0.6, 0.2, (0.4, 0.4, 0.3, 0.5)),
        # ε = 0 is a uniform p = 1 − density, as dare
        ((1, -3, 2), 0.7, 0.0, (0.3, 0.3, 0.3)),
        # a single entry, or all equal, sits in the middle: p
        ((5,), 0.5, 0.4, (0.5,)),
        ((2, -2, 2), 0.5, 0.4, (0.5, 0.5, 0.5)),
    ],
)
def test_della_drop_probabilities_per_rank(tau, density, epsilon, expected):
    probabilities = drop_probabilities(t(*tau, dtype=torch.float64), density, epsilon)
    assert_close(probabilities, t(*expected, dtype=torch.float64), atol=1e-12)


def test_della_rank_is_taken_over_the_whole_tensor():
    # a 2-D tensor ranks its 4 entries together (not per row): positions 0, 1/3, 2/3, 1
    probabilities = drop_probabilities(torch.tensor([[4.0, 1.0], [2.0, 3.0]]), 0.5, 0.3)
    assert_close(probabilities, torch.tensor([[0.35, 0.65], [0.55, 0.45]]))


DELLA_TAU = torch.linspace(-2.0, 3.0, 24)


def test_della_rescales_each_kept_entry_by_its_own_probability():
    # density 0.5, ε 0.4: p_i from 0.7 (smallest |.|) to 0.3 (largest)
    probabilities = drop_probabilities(DELLA_TAU, 0.5, 0.4)
    for seed in range(5):
        pruned = magprune(DELLA_TAU, task="a", name="x", density=0.5, epsilon=0.4, seed=seed)
        kept = pruned != 0
        assert 0 < int(kept.sum()) < 24
        assert_close(pruned[kept], DELLA_TAU[kept] / (1 - probabilities[kept]))


def test_della_never_drops_an_entry_of_probability_zero():
    # density 0.6, ε 0.8: p_i from 0.8 down to 0 at the largest |.| (3.0, the last entry)
    draws = [
        magprune(DELLA_TAU, task="a", name="x", density=0.6, epsilon=0.8, seed=seed)
        for seed in range(200)
    ]
    assert all(float(pruned[-1]) == 3.0 for pruned in draws)
    assert any(float(pruned[0]) == 0.0 for pruned in draws)


def test_della_is_unbiased_and_drops_small_magnitudes_more():
    draws = torch.stack(
        [
            magprune(DELLA_TAU, task="a", name="x", density=0.5, epsilon=0.3, seed=seed)
            for seed in range(1000)
        ]
    )
    # each entry averages 1000 draws of {0, τ/(1 − p_i)}, p_i <= 0.65: standard error at most
    # |τ| · sqrt(0.65/0.35/1000) ≈ 0.043 |τ|; rescaling all by 1/(1 − p) instead would miss
    # the smallest entries by (1 − 0.5)/(1 − 0.65) − 1 ≈ 43%
    assert torch.allclose(draws.mean(dim=0), DELLA_TAU, rtol=0.25, atol=0)
    assert not torch.allclose(draws[:1].mean(dim=0), DELLA_TAU, rtol=0.25, atol=0)
    kept = (draws != 0).float().mean(dim=0)
    expected = 1 - drop_probabilities(DELLA_TAU, 0.5, 0.3)
    # keep rates 0.35..0.65 over 1000 draws: standard error <= 0.016, tolerance 0.08
    assert torch.allclose(kept, expected, rtol=0, atol=0.08)


def test_della_elects_and_merges_disjointly_without_a_trim():
    # no drop (density 1, ε 0): sums [3, -3, 4] elect [+, -, +]; agreeing means:
    # [(3 + 1)/2, (-1 - 4)/2, (2 + 2)/2] = [2, -2.5, 2] (c's 0 does not count);
    # θ = [1, 1, 1] + 0.5 · [2, -2.5, 2]. A ties trim at density 0.2 would keep only 3, -4, 2s.
    tasks = vectors(a=t(3, -1, 2), b=t(-1, 2, 2), c=t(1, -4, 0))
    result = merged_x("della", t(1, 1, 1), tasks, 0.5, density=1.0, epsilon=0.0)
    assert_close(result, t(2, -0.25, 2))


def test_della_applies_lambda_after_pruning_and_alpha_before_the_election():
    pruned = magprune(DELLA_TAU, task="a", name="x", density=0.5, epsilon=0.3, seed=4)
    result = merged_x("della", torch.zeros(24), vectors(a=DELLA_TAU), 0.5, epsilon=0.3, seed=4)
    assert_close(result, 0.5 * pruned)
    # α_b = -3 flips b's sign, so b's entries now agree with a's wherever both are kept
    tasks = vectors(a=DELLA_TAU, b=-DELLA_TAU)
    per_task = merged_x("della", torch.zeros(24), tasks, {"a": 1.0, "b": -3.0}, seed=4)
    first = magprune(DELLA_TAU, task="a", name="x", density=0.5, epsilon=0.15, seed=4)
    second = -3 * magprune(-DELLA_TAU, task="b", name="x", density=0.5, epsilon=0.15, seed=4)
    count = (first != 0).float() + (second != 0).float()
    assert_close(per_task, (first + second) / count.clamp(min=1), atol=1e-5)


def test_della_stream_depends_only_on_seed_task_and_tensor_name():
    alone = merged_x("della", torch.zeros(24), vectors(a=DELLA_TAU), seed=5)
    with_zero = merged_x("della", torch.zeros(24), vectors(a=DELLA_TAU, z=torch.zeros(24)), seed=5)
    assert torch.equal(alone, with_zero)
    assert not torch.equal(alone, merged_x("della", torch.zeros(24), vectors(b=DELLA_TAU), seed=5))
    assert not torch.equal(alone, merged_x("della", torch.zeros(24), vectors(a=DELLA_TAU), seed=6))


@pytest.mark.parametrize(("density", "epsilon"), [(0.9, 0.3), (0.2, 0.4), (1.0, 0.1)])
def test_della_refuses_probabilities_outside_zero_one(density, epsilon):
    with pytest.raises(MergeInputError, match="outside \\[0, 1\\)"):
        merged_x("della", torch.zeros(2), vectors(a=t(1, 2)), density=density, epsilon=epsilon)

"""weight_average, task_arithmetic, ties and dare against hand-computed examples (MERGING.md).

breadcrumbs, tall_masks and consensus: test_merge_mask_methods.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge import merge, negate
from workers.merge.dare import drop_and_rescale
from workers.merge.ties import global_trim_thresholds, task_trim_threshold, trim_count


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def vectors(**tasks: Tensor) -> dict[str, dict[str, Tensor]]:
    """One-tensor task vectors named 'x'."""
    return {task: {"x": value} for task, value in tasks.items()}


def merged_x(method: str, base: Tensor, tasks: dict, coefficient=1.0, **params) -> Tensor:
    return merge(method, {"x": base}, tasks, coefficient, **params)["x"]


def assert_equal(actual: Tensor, expected: Tensor) -> None:
    assert torch.allclose(actual, expected, rtol=0, atol=1e-6), f"{actual} != {expected}"


# ---------------------------------------------------------------- weight_average / arithmetic


def test_weight_average_is_the_mean_of_the_models():
    # θ0 + (τa + τb) / 2 = [1, 2] + ([2, 0] + [0, 4]) / 2 = [2, 4]
    result = merged_x("weight_average", t(1, 2), vectors(a=t(2, 0), b=t(0, 4)))
    assert_equal(result, t(2, 4))


def test_task_arithmetic_shared_and_per_task():
    tasks = vectors(a=t(1, -2), b=t(3, 0.5))
    # [1, 1] + 0.5 · ([1, -2] + [3, 0.5]) = [1 + 2, 1 - 0.75] = [3, 0.25]
    assert_equal(merged_x("task_arithmetic", t(1, 1), tasks, 0.5), t(3, 0.25))
    # [1, 1] + 2 · [1, -2] − 1 · [3, 0.5] = [1 + 2 - 3, 1 - 4 - 0.5] = [0, -3.5]
    assert_equal(merged_x("task_arithmetic", t(1, 1), tasks, {"a": 2.0, "b": -1.0}), t(0, -3.5))


def test_negation():
    # [1, 1] − 0.5 · [1, -2] = [0.5, 2]
    assert_equal(negate({"x": t(1, 1)}, {"x": t(1, -2)}, 0.5)["x"], t(0.5, 2))


# ---------------------------------------------------------------------------------- ties

# density 0.5 of 4 entries keeps k = 2 per task (per_tensor scope):
#   a = [3, -1, 2, 0.5]   2nd largest |.| = 2        -> [3, 0, 2, 0]
#   b = [-1, 4, -2, 0.5]  2nd largest |.| = 2        -> [0, 4, -2, 0]
#   c = [1, 1, -1, 0.25]  2nd largest |.| = 1, tie   -> [1, 1, -1, 0]  (all three 1s kept)
# sums [4, 5, -1, 0] -> elected signs [+, +, -, majority(+)]
TIES_TASKS = vectors(a=t(3, -1, 2, 0.5), b=t(-1, 4, -2, 0.5), c=t(1, 1, -1, 0.25))


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # mean of agreeing: [(3+1)/2, (4+1)/2, (-2-1)/2, 0] = [2, 2.5, -1.5, 0]
        ("mean", t(2, 2.5, -1.5, 0)),
        # sum of agreeing: [3+1, 4+1, -2-1, 0] = [4, 5, -3, 0]
        ("sum", t(4, 5, -3, 0)),
        # sign times largest agreeing |.|: [3, 4, -2, 0]
        ("max", t(3, 4, -2, 0)),
    ],
)
def test_ties_keeps_threshold_ties_and_merges_disjointly(rule, expected):
    result = merged_x(
        "ties", torch.zeros(4), TIES_TASKS, density=0.5, scope="per_tensor", merge=rule
    )
    assert_equal(result, expected)


def test_ties_applies_lambda_at_the_end():
    # base + 2 · [2, 2.5, -1.5, 0] = [1 + 4, 1 + 5, 1 - 3, 1]
    result = merged_x("ties", torch.ones(4), TIES_TASKS, 2.0, density=0.5, scope="per_tensor")
    assert_equal(result, t(5, 6, -2, 1))


def test_ties_zero_sum_takes_the_majority_sign():
    # density 1: sums [2-2, 3+1, 1+1] = [0, 4, 2] -> signs [0, +, +]; majority + -> first
    # entry keeps a's +2 only: [2, (3+1)/2, (1+1)/2] = [2, 2, 1]
    positive = vectors(a=t(2, 3, 1), b=t(-2, 1, 1))
    assert_equal(merged_x("ties", torch.zeros(3), positive, density=1.0), t(2, 2, 1))
    # mirrored: sums [0, -4, -2] -> majority − -> first entry keeps b's −2: [-2, -2, -1]
    negative = vectors(a=t(2, -3, -1), b=t(-2, -1, -1))
    assert_equal(merged_x("ties", torch.zeros(3), negative, density=1.0), t(-2, -2, -1))


# Two tensors, density 1 (nothing trimmed), tasks a and b:
#   w: a = [2, 3, 1], b = [-2, 1, 1]             sums [0, 4, 2]        signs [0, +, +]  (+2)
#   v: a = [-1, -1, -1, -1, 5], b = [-1]*4 + [-5] sums [-2]*4 + [0]    signs [−]*4 + [0] (−4)
# w alone has a + majority, v alone a − one; the whole backbone counts 2 − 4 = −2: majority −.
MAJORITY_BASE = {"w": torch.zeros(3), "v": torch.zeros(5)}
MAJORITY_TASKS = {
    "a": {"w": t(2, 3, 1), "v": t(-1, -1, -1, -1, 5)},
    "b": {"w": t(-2, 1, 1), "v": t(-1, -1, -1, -1, -5)},
}
# global: w's zero sum takes − and keeps b's −2; the rest is the agreeing mean
GLOBAL_MAJORITY = {"w": t(-2, 2, 1), "v": t(-1, -1, -1, -1, -5)}
# per tensor: w's zero sum takes w's own + and keeps a's +2; v's takes − and keeps b's −5
TENSOR_MAJORITY = {"w": t(2, 2, 1), "v": t(-1, -1, -1, -1, -5)}


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 1.0}),
        ("ties", {"density": 1.0, "scope": "global"}),
        ("dare", {"p": 0.0, "then": "ties", "density": 1.0}),
    ],
)
def test_ties_global_scope_takes_the_whole_backbones_majority_sign(method, params):
    result = merge(method, MAJORITY_BASE, MAJORITY_TASKS, **params)
    for name, expected in GLOBAL_MAJORITY.items():
        assert_equal(result[name], expected)


def test_ties_per_tensor_scope_takes_each_tensors_majority_sign():
    result = merge("ties", MAJORITY_BASE, MAJORITY_TASKS, density=1.0, scope="per_tensor")
    for name, expected in TENSOR_MAJORITY.items():
        assert_equal(result[name], expected)


def test_tall_masks_with_ties_elects_over_the_whole_backbone():
    # use_ties: τ_MTL is ties (density 0.2, scope global, merge: sum). Each task has 6 entries
    # and keeps ceil(0.2 · 6) = 2, its 4 and its 3:
    #   w: a [4, 0, 0], b [−4, 0, 0]   sums [0, 0, 0]    balance 0
    #   v: a [−3, 0, 0], b [0, −3, 0]  sums [−3, −3, 0]  balance −2
    # w alone would elect + and keep a's 4; the backbone's majority is −, so w0 keeps b's −4.
    # τ_MTL: w [−4, 0, 0], v [−3, −3, 0]. Task b's mask (λ 0.4), |τ_b| ≥ 0.4 |τ_MTL − τ_b|:
    #   w: [4, .1, .1] ≥ 0.4 · [0, .1, .1]          -> all kept  -> [−4, 0, 0]
    #   v: [.1, 3, .1] ≥ 0.4 · [3.1, 0, .1]          -> [F, T, T] -> [0, −3, 0]
    base = {"w": torch.zeros(3), "v": torch.zeros(3)}
    tasks = {
        "a": {"w": t(4, 0.1, 0.1), "v": t(-3, 0.1, 0.1)},
        "b": {"w": t(-4, 0.1, 0.1), "v": t(0.1, -3, 0.1)},
    }
    result = merge("tall_masks", base, tasks, task="b", use_ties=True)
    assert_equal(result["w"], t(-4, 0, 0))
    assert_equal(result["v"], t(0, -3, 0))


def test_ties_density_one_with_agreeing_signs_is_weight_averaging():
    # mean of [1, 2, -3] and [3, 4, -1] = [2, 3, -2]
    tasks = vectors(a=t(1, 2, -3), b=t(3, 4, -1))
    result = merged_x("ties", t(1, 1, 1), tasks, density=1.0)
    assert_equal(result, t(3, 4, -1))
    assert_equal(result, merged_x("weight_average", t(1, 1, 1), tasks))


def test_ties_per_task_coefficients_scale_before_the_election():
    tasks = vectors(a=t(1, -1), b=t(-1.5, 1))
    # α = {a: 2, b: 1}: a -> [2, -2]; sums [0.5, -1] -> signs [+, −] -> [2, -2]
    assert_equal(
        merged_x("ties", torch.zeros(2), tasks, {"a": 2.0, "b": 1.0}, density=1.0), t(2, -2)
    )
    # shared λ = 1: sums [-0.5, 0] -> signs [−, majority −] -> [-1.5, -1]
    assert_equal(merged_x("ties", torch.zeros(2), tasks, 1.0, density=1.0), t(-1.5, -1))


def test_ties_global_and_per_tensor_scopes_differ():
    # one task, density 0.5. per_tensor keeps the top 1 of each 2-entry tensor;
    # global keeps the top 2 of all 4 entries {20, 10, 2, 1} -> w untouched, b zeroed
    base = {"w": torch.zeros(2), "b": torch.zeros(2)}
    tasks = {"a": {"w": t(10, 20), "b": t(1, 2)}}
    per_tensor = merge("ties", base, tasks, density=0.5, scope="per_tensor")
    global_ = merge("ties", base, tasks, density=0.5, scope="global")
    assert_equal(per_tensor["w"], t(0, 20))
    assert_equal(per_tensor["b"], t(0, 2))
    assert_equal(global_["w"], t(10, 20))
    assert_equal(global_["b"], t(0, 0))


def test_trim_count_rounds_up_exactly():
    assert [trim_count(10, d) for d in (0.2, 0.3, 0.05, 1.0)] == [2, 3, 1, 10]
    assert trim_count(100, 0.29) == 29  # 0.29 · 100 is 28.999… in binary floating point
    # k = 3 of 10: 3rd largest of |0..9| is 7; ties at 7 do not change the value
    assert task_trim_threshold([torch.arange(10.0)], 0.3) == 7.0


@pytest.mark.parametrize("density", [0.001, 0.2, 0.37, 1.0])
def test_streamed_global_thresholds_equal_in_memory(density):
    generator = torch.Generator().manual_seed(3)
    tasks = {
        task: {
            "w": torch.randn(40, 9, generator=generator),
            "b": torch.randn(11, generator=generator).to(torch.bfloat16),
            "steps": torch.randint(-3, 4, (30,), generator=generator).to(torch.float64),  # ties
            "empty": torch.zeros(0, 3),
        }
        for task in ("a", "b")
    }
    coefficient = {"a": 0.3, "b": -1.7}
    passes = []

    def stream():
        passes.append(1)
        for task, vector in tasks.items():
            for tensor in vector.values():
                yield task, tensor

    streamed = global_trim_thresholds(stream, density, coefficient)
    assert len(passes) == 4
    for task, vector in tasks.items():
        scaled = [
            v.to(torch.float64 if v.dtype == torch.float64 else torch.float32) * coefficient[task]
            for v in vector.values()
        ]
        assert streamed[task] == task_trim_threshold(scaled, density)
        # brute force: the k-th largest |value| over the whole backbone
        flat = torch.cat([s.abs().double().flatten() for s in scaled]).sort(descending=True).values
        assert streamed[task] == float(flat[trim_count(flat.numel(), density) - 1])


def test_streamed_thresholds_of_an_all_zero_or_empty_task_are_zero():
    stream = lambda: iter([("a", torch.zeros(0)), ("b", torch.zeros(4))])  # noqa: E731
    assert global_trim_thresholds(stream, 0.2) == {"a": 0.0, "b": 0.0}


def test_streamed_thresholds_refuse_a_stream_that_changes_between_passes():
    calls = []

    def stream():
        calls.append(1)
        yield "a", torch.arange(10.0) if len(calls) == 1 else torch.zeros(0)

    with pytest.raises(MergeInputError, match="'a' yielded different tensors on another pass"):
        global_trim_thresholds(stream, 0.5)


# ---------------------------------------------------------------------------------- dare


DARE_TASKS = vectors(a=torch.arange(1.0, 41.0), b=-torch.arange(1.0, 41.0).flip(0))


def test_dare_p_zero_is_the_identity():
    base = torch.ones(40)
    expected = merged_x("task_arithmetic", base, DARE_TASKS, 0.7)
    assert torch.equal(merged_x("dare", base, DARE_TASKS, 0.7, p=0.0), expected)
    ties = merged_x("ties", base, DARE_TASKS, 0.7, density=0.5)
    assert torch.equal(
        merged_x("dare", base, DARE_TASKS, 0.7, p=0.0, then="ties", density=0.5), ties
    )


@pytest.mark.parametrize(("rescale", "factor"), [(True, 1 / (1 - 0.75)), (False, 1.0)])
def test_dare_drops_and_rescales(rescale, factor):
    tau = torch.arange(1.0, 41.0)
    result = merged_x("dare", torch.zeros(40), {"a": {"x": tau}}, p=0.75, rescale=rescale)
    kept = result != 0
    assert_equal(result[kept], tau[kept] * factor)  # kept entries are τ / (1 − p) or τ
    assert 0 < int(kept.sum()) < 40


def test_dare_is_reproducible_from_the_seed():
    first = merged_x("dare", torch.zeros(40), DARE_TASKS, seed=11)
    assert torch.equal(first, merged_x("dare", torch.zeros(40), DARE_TASKS, seed=11))
    assert not torch.equal(first, merged_x("dare", torch.zeros(40), DARE_TASKS, seed=12))


def test_dare_stream_depends_only_on_seed_task_and_tensor_name():
    alone = merged_x("dare", torch.zeros(40), {"a": DARE_TASKS["a"]}, seed=5)
    with_other = merged_x(
        "dare", torch.zeros(40), {"a": DARE_TASKS["a"], "z": {"x": torch.zeros(40)}}, seed=5
    )
    assert torch.equal(alone, with_other)
    renamed = merged_x("dare", torch.zeros(40), {"a2": DARE_TASKS["a"]}, seed=5)
    assert not torch.equal(alone, renamed)
    mask_x = drop_and_rescale(torch.ones(40), task="a", name="x", p=0.5) != 0
    mask_y = drop_and_rescale(torch.ones(40), task="a", name="y", p=0.5) != 0
    assert not torch.equal(mask_x, mask_y)


def test_dare_is_unbiased_over_seeds():
    tau = torch.linspace(-2.0, 3.0, 25)
    draws = [drop_and_rescale(tau, task="a", name="x", p=0.5, seed=seed) for seed in range(300)]
    mean = torch.stack(draws).mean(dim=0)
    # each entry averages 300 draws of {0, 2τ}: standard error |τ| / sqrt(300) ≈ 0.06 |τ|
    assert torch.allclose(mean, tau, rtol=0.3, atol=0.05)
    assert not torch.allclose(torch.stack(draws[:1]).mean(dim=0), tau, rtol=0.3, atol=0.05)

"""Breadcrumbs, TALL masks and consensus against small hand-computed examples (MERGING.md)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge import merge
from workers.merge.breadcrumbs import breadcrumbs_mask
from workers.merge.tall_masks import pack_mask, tall_mask, unpack_mask


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def vectors(**tasks: Tensor) -> dict[str, dict[str, Tensor]]:
    """One-tensor task vectors named 'x'."""
    return {task: {"x": value} for task, value in tasks.items()}


def merged_x(method: str, base: Tensor, tasks: dict, coefficient=1.0, **params) -> Tensor:
    return merge(method, {"x": base}, tasks, coefficient, **params)["x"]


def assert_equal(actual: Tensor, expected: Tensor) -> None:
    assert torch.allclose(actual, expected, rtol=0, atol=1e-6), f"{actual} != {expected}"


# ---------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_masks_each_row():
    # rows of n = 10, gamma 0.1 -> 1 outlier, beta 0.3 -> keep the next 3 by |value|
    tau = torch.tensor(
        [[10, -9, 8, 7, -6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8, 9, -10]], dtype=torch.float32
    )
    expected = torch.tensor(
        [[0, -9, 8, 7, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 7, 8, 9, 0]], dtype=torch.float32
    )
    result = merge("breadcrumbs", {"x": torch.zeros(2, 10)}, {"a": {"x": tau}}, beta=0.3, gamma=0.1)
    assert_equal(result["x"], expected)


def test_breadcrumbs_outlier_count_rounding_to_zero_removes_no_outliers():
    # n = 5: floor(5 · 0.1) = 0 outliers, floor(5 · 0.4) = 2 kept -> the two largest stay
    result = merged_x(
        "breadcrumbs", torch.zeros(5), vectors(a=t(5, -4, 3, 2, 1)), beta=0.4, gamma=0.1
    )
    assert_equal(result, t(5, -4, 0, 0, 0))


def test_breadcrumbs_counts_are_exact_floors():
    mask = breadcrumbs_mask(torch.arange(1.0, 101.0), beta=0.29, gamma=0.07)
    assert int(mask.sum()) == 29 and not bool(mask[-7:].any()) and bool(mask[-36:-7].all())


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        # n = 3, gamma 0 -> no outliers, beta 0.7 -> keep 2: a -> [3, -2, 0], b -> [0, 4, 2]
        ("task_arithmetic", t(3, 2, 2)),  # [3 + 0, -2 + 4, 0 + 2]
        ("ties", t(3, 4, 2)),  # signs [+, +, +]: b's 4 alone agrees in the middle
    ],
)
def test_breadcrumbs_then(then, expected):
    tasks = vectors(a=t(3, -2, 1), b=t(-1, 4, 2))
    assert_equal(
        merged_x("breadcrumbs", torch.zeros(3), tasks, beta=0.7, gamma=0.0, then=then), expected
    )


# ------------------------------------------------------------------------------ tall_masks

# τa = [1, 1, 2, -1], τb = [2, 2.5, -2, 1], λ = 0.5 -> τ_MTL = [3, 3.5, 0, 0]
# mask a: |τa| = [1, 1, 2, 1] ≥ 0.5 · |τ_MTL − τa| = [1, 1.25, 1, 0.5] -> [T (equal), F, T, T]
# mask b: |τb| = [2, 2.5, 2, 1] ≥ 0.5 · |τ_MTL − τb| = [0.5, 0.5, 1, 0.5] -> all T
TALL_TASKS = vectors(a=t(1, 1, 2, -1), b=t(2, 2.5, -2, 1))


@pytest.mark.parametrize(("task", "expected"), [("a", t(4, 1, 1, 1)), ("b", t(4, 4.5, 1, 1))])
def test_tall_masks_retrieves_each_task(task, expected):
    # ones + m ∘ [3, 3.5, 0, 0]
    result = merged_x("tall_masks", torch.ones(4), TALL_TASKS, 0.123, task=task, lam=0.5)
    assert_equal(result, expected)


def test_tall_mask_keeps_equality_and_drops_just_below():
    below = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    task_vector = torch.stack([torch.tensor(1.0), below])
    # |τ_MTL − τ| = [2, 2 (rounded)] · 0.5 = [1, 1]: 1 ≥ 1 kept, 0.99999994 ≥ 1 dropped
    assert tall_mask(task_vector, t(3, 3), 0.5).tolist() == [True, False]


def test_tall_masks_use_ties():
    # density 0.2 of 5 keeps 1 per task: a -> [4, 0, 0, 0, 0], b -> [0, 3, 0, 0, 0]
    # ties merge=sum: τ_MTL = [4, 3, 0, 0, 0] (plain sum would be [3, 4, 0, 1, 1])
    # mask b: |τb| = [1, 3, 1, .5, .5] ≥ 0.4 · |τ_MTL − τb| = [2, 0, .4, .2, .2] -> [F, T, T, T, T]
    tasks = vectors(a=t(4, 1, -1, 0.5, 0.5), b=t(-1, 3, 1, 0.5, 0.5))
    result = merged_x("tall_masks", torch.zeros(5), tasks, task="b", lam=0.4, use_ties=True)
    assert_equal(result, t(0, 3, 0, 0, 0))


def test_pack_unpack_round_trip_and_bit_order():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b10000001, 0b10000000]
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    generator = torch.Generator().manual_seed(0)
    random_mask = torch.rand(3, 7, generator=generator) > 0.5
    packed = pack_mask(random_mask)
    assert packed.numel() == 3  # 21 bits -> 3 bytes
    assert torch.equal(unpack_mask(packed, (3, 7)), random_mask)
    with pytest.raises(MergeInputError, match="needs 4 uint8 bytes"):
        unpack_mask(packed, (4, 7))


# ------------------------------------------------------------------------------- consensus

# λ_t = 0.5 for every task:
#   τa = [1, 0, 2, 0.25], τb = [1, 3, -2, 0.25], τc = [1, 0, 0, 5] -> τ_MTL = [3, 3, 0, 5.5]
#   a: |τa| = [1, 0, 2, .25] ≥ .5 · [2, 3, 2, 5.25] = [1, 1.5, 1, 2.625] -> [T, F, T, F]
#   b: |τb| = [1, 3, 2, .25] ≥ .5 · [2, 0, 2, 5.25] = [1, 0, 1, 2.625]   -> [T, T, T, F]
#   c: |τc| = [1, 0, 0, 5]   ≥ .5 · [2, 3, 0, 0.5]  = [1, 1.5, 0, 0.25]  -> [T, F, T, T]
#   votes [3, 1, 3, 1]
CONSENSUS_TASKS = vectors(a=t(1, 0, 2, 0.25), b=t(1, 3, -2, 0.25), c=t(1, 0, 0, 5))


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (2, t(1.5, 0, 0, 0)),  # mask [T, F, T, F] -> 0.5 · [3, 0, 0, 0]
        (1, t(1.5, 1.5, 0, 2.75)),  # all kept -> 0.5 · [3, 3, 0, 5.5]
        (4, t(0, 0, 0, 0)),  # k > T -> θ0
    ],
)
def test_consensus_keeps_weights_used_by_k_tasks(k, expected):
    result = merged_x("consensus", torch.zeros(4), CONSENSUS_TASKS, 0.5, k=k, lam=0.5)
    assert_equal(result, expected)


def test_consensus_k_zero_is_task_arithmetic_and_k_above_t_is_base():
    generator = torch.Generator().manual_seed(2)
    base = {"x": torch.randn(6, 4, generator=generator)}
    tasks = {task: {"x": torch.randn(6, 4, generator=generator)} for task in "abc"}
    arithmetic = merge("task_arithmetic", base, tasks, 0.3)
    assert torch.equal(merge("consensus", base, tasks, 0.3, k=0)["x"], arithmetic["x"])
    assert not torch.equal(merge("consensus", base, tasks, 0.3, k=2)["x"], arithmetic["x"])
    assert torch.equal(merge("consensus", base, tasks, 0.3, k=4)["x"], base["x"])
    ties = merge("ties", base, tasks, 0.3, merge="sum")
    assert torch.equal(merge("consensus", base, tasks, 0.3, k=0, use_ties=True)["x"], ties["x"])


def test_consensus_per_task_lambdas():
    # λ_c = 20: |τc| = [1, 0, 0, 5] ≥ 20 · [2, 3, 0, 0.5] = [40, 60, 0, 10] -> [F, F, T, F]
    # votes [2, 1, 3, 0] -> k = 2 keeps [T, F, T, F]
    lam = {"a": 0.5, "b": 0.5, "c": 20.0}
    result = merged_x("consensus", torch.zeros(4), CONSENSUS_TASKS, 1.0, k=2, lam=lam)
    assert_equal(result, t(3, 0, 0, 0))
    # k = 1 now also drops the last entry (only c voted for it before)
    assert_equal(
        merged_x("consensus", torch.zeros(4), CONSENSUS_TASKS, 1.0, k=1, lam=lam), t(3, 3, 0, 0)
    )

"""tsv, iso_c and iso_cts against hand-computed examples and their properties (MERGING.md).

The hand examples use matrices whose SVDs are read off by eye. Polar factors in them are of
two unit vectors at 45° in a plane: the nearest orthonormal pair keeps their bisector and sits
at ±45° from it, i.e. each vector turns 22.5° away from the other (C, S = cos, sin 22.5°).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge import merge
from workers.merge.iso_cts import subspace_sizes
from workers.merge.tsv import kept_count, orthogonalise, significant_triplets

C, S = math.cos(math.pi / 8), math.sin(math.pi / 8)
R = math.sqrt(2)
METHODS = ["tsv", "iso_c", "iso_cts"]


def m(*rows: list[float]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def merged_x(method: str, base: Tensor, tasks: dict, coefficient=1.0, **params) -> Tensor:
    vectors = {task: {"x": value} for task, value in tasks.items()}
    return merge(method, {"x": base}, vectors, coefficient, **params)["x"]


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-5) -> None:
    assert torch.allclose(actual, expected, rtol=0, atol=atol), f"{actual} != {expected}"


def random_tasks(*shape: int, count: int = 3, seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(shape, generator=generator) for i in range(count)}


def rank_one(rows: int, cols: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.outer(
        torch.randn(rows, generator=generator), torch.randn(cols, generator=generator)
    )


# ---------------------------------------------------------------------------------- tsv


def test_tsv_hand_example():
    # a = diag(3, 1): its top triplet is σ 3, u = e1, v = e1 (k = r // T = 1 drops the σ 1).
    # b = 2 p e2ᵀ, p = (e1 + e2)/√2: σ 2, u = p, v = e2.
    # U = [e1, p] (0° and 45°) -> U⊥ = [(C, −S), (S, C)]; V = [e1, e2] = V⊥.
    # τ = U⊥ diag(3, 2) V⊥ᵀ = [[3C, 2S], [−3S, 2C]]; θ = θ0 + 0.5 τ.
    tasks = {"a": m([3, 0], [0, 1]), "b": m([0, R], [0, R])}
    base = m([1, 0], [0, -1])
    expected = base + 0.5 * m([3 * C, 2 * S], [-3 * S, 2 * C])
    assert_close(merged_x("tsv", base, tasks, 0.5), expected)


def test_tsv_one_task_with_fraction_one_is_task_arithmetic():
    tau = random_tasks(5, 3, count=1)
    base = torch.ones(5, 3)
    expected = merged_x("task_arithmetic", base, tau, 0.7)
    assert_close(merged_x("tsv", base, tau, 0.7, fraction=1.0), expected)


def test_tsv_orthogonalised_singular_vectors_are_orthonormal():
    taus = list(random_tasks(8, 6).values())
    triplets = [significant_triplets(tau, 2) for tau in taus]
    u = torch.cat([u for u, _, _ in triplets], dim=1)
    assert not torch.allclose(u.T @ u, torch.eye(6), atol=1e-3)  # the tasks' U do interfere
    u, s, vh = orthogonalise(triplets)
    assert u.shape == (8, 6) and vh.shape == (6, 6) and s.shape == (6,)
    assert_close(u.T @ u, torch.eye(6))
    assert_close(vh @ vh.T, torch.eye(6))


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (4, 3, None, 1),
        (6, 2, None, 3),
        (2, 3, None, 1),  # at least 1: the reference's floor(2/3) = 0 would zero the layer
        (100, 1, 0.29, 29),  # exact decimal: 0.29 * 100 is 28.999... in floating point
        (4, 1, 1.0, 4),
    ],
)
def test_tsv_kept_count(rank, tasks, fraction, expected):
    assert kept_count(rank, tasks, fraction) == expected


def test_tsv_layer_narrower_than_the_task_count_still_merges():
    tasks = random_tasks(2, 5, count=3)
    assert merged_x("tsv", torch.zeros(2, 5), tasks).abs().sum() > 0


def test_tsv_zero_task_does_not_tilt_the_others():
    tasks = random_tasks(4, 4, count=2)
    with_zero = {**tasks, "zero": torch.zeros(4, 4)}
    expected = merged_x("tsv", torch.zeros(4, 4), tasks, fraction=0.5)
    assert_close(merged_x("tsv", torch.zeros(4, 4), with_zero, fraction=0.5), expected)


# -------------------------------------------------------------------------------- iso_c


@pytest.mark.parametrize(
    ("tasks", "expected"),
    [
        # Δ = [[0, 4], [−2, 0]]: σ 4 (u = e1, v = e2), σ 2 (u = −e2, v = e1); σ̄ = 3,
        # U Vᵀ = e1 e2ᵀ − e2 e1ᵀ.
        ({"a": m([0, 3], [0, 0]), "b": m([0, 1], [-2, 0])}, m([0, 3], [-3, 0])),
        # Δ = [[0, 0, 4], [2, 0, 0]]: σ 4 (e1, e3), σ 2 (e2, e1); σ̄ = 3, U Vᵀ = e1 e3ᵀ + e2 e1ᵀ.
        ({"a": m([0, 0, 4], [2, 0, 0])}, m([0, 0, 3], [3, 0, 0])),
    ],
)
def test_iso_c_hand_examples(tasks, expected):
    base = torch.ones(expected.shape)
    assert_close(merged_x("iso_c", base, tasks, 0.5), base + 0.5 * expected)


def test_iso_c_flattens_the_spectrum_to_its_mean():
    tasks = random_tasks(6, 4)
    delta = sum(tasks.values())
    merged = merged_x("iso_c", torch.zeros(6, 4), tasks)
    mean = torch.linalg.svdvals(delta).mean()
    assert_close(torch.linalg.svdvals(merged), mean.expand(4))


@pytest.mark.parametrize("count", [1, 2])
def test_iso_c_of_a_rank_one_sum_is_the_sum(count):
    # one direction: its mean singular value is itself (no arbitrary null-space directions)
    tau = rank_one(5, 4)
    tasks = {f"t{i}": tau * (i + 1) for i in range(count)}
    delta = sum(tasks.values())
    assert_close(merged_x("iso_c", torch.zeros(5, 4), tasks), delta)


# ------------------------------------------------------------------------------ iso_cts


def test_iso_cts_hand_example():
    # r = 3, two tasks, common 0.5: c0 = 1, share s = 1, c = 1.
    # a = 4 e1e1ᵀ + e2e2ᵀ, b = 2 e1e1ᵀ + 2 p e3ᵀ with p = (e2 + e3)/√2.
    # Δ = 6 e1e1ᵀ + [[1, √2], [0, √2]] on (e2, e3), whose σ are < 6: common = (6, e1, e1).
    # Off e1: a -> e2e2ᵀ (σ 1, e2, e2); b -> 2 p e3ᵀ (σ 2, p, e3).
    # U = [e2, p, e1] -> U⊥ = [C e2 − S e3, S e2 + C e3, e1]; V = [e2, e3, e1] = V⊥.
    # σ̄ = (1 + 2 + 6) / 3 = 3; τ = 3 U⊥ V⊥ᵀ.
    tasks = {"a": m([4, 0, 0], [0, 1, 0], [0, 0, 0]), "b": m([2, 0, 0], [0, 0, R], [0, 0, R])}
    expected = m([3, 0, 0], [0, 3 * C, 3 * S], [0, -3 * S, 3 * C])
    base = torch.eye(3)
    assert_close(merged_x("iso_cts", base, tasks, 2.0, common=0.5), base + 2 * expected)


@pytest.mark.parametrize(
    ("rank", "tasks", "common", "expected"),
    [
        (4, 3, 0.8, (4, 0)),  # (4 − 3) / 3 rounds to 0: all common
        (5, 2, 0.5, (1, 2)),  # 1.5 -> 2 (half to even)
        (9, 2, 0.5, (5, 2)),  # 2.5 -> 2 (half to even)
        (13, 2, 0.5, (5, 4)),  # 3.5 -> 4 (half to even)
        (7, 2, 0.5, (3, 2)),
        (2, 3, 0.0, (2, 0)),  # 2/3 rounds to 1 but 3 tasks do not fit in rank 2
        (10, 4, 0.29, (2, 2)),  # floor(2.9) = 2, 8/4 = 2
    ],
)
def test_iso_cts_subspace_sizes(rank, tasks, common, expected):
    assert subspace_sizes(rank, tasks, common) == expected


def test_iso_cts_spectrum_is_isotropic_and_differs_from_iso_c():
    tasks = random_tasks(6, 4)
    merged = merged_x("iso_cts", torch.zeros(6, 4), tasks, common=0.25)  # c 1, s 1
    values = torch.linalg.svdvals(merged)
    assert_close(values, values.mean().expand(4))
    assert not torch.allclose(merged, merged_x("iso_c", torch.zeros(6, 4), tasks), atol=1e-3)


def test_iso_cts_task_inside_the_common_subspace_adds_no_rounding_noise():
    # r 4, two tasks, common 0.5: c = 2, s = 1. Both tasks are Δ's one direction: off it only
    # rounding noise is left, which must not enter as task-specific directions.
    tau = rank_one(6, 4)
    tasks = {"a": tau, "b": tau}
    assert_close(merged_x("iso_cts", torch.zeros(6, 4), tasks, common=0.5), 2 * tau)


@pytest.mark.parametrize(
    ("tasks", "params"),
    [(random_tasks(6, 4), {"common": 1.0}), (random_tasks(6, 4, count=1), {})],
    ids=["common-one", "one-task"],
)
def test_iso_cts_reduces_to_iso_c(tasks, params):
    expected = merged_x("iso_c", torch.zeros(6, 4), tasks)
    assert_close(merged_x("iso_cts", torch.zeros(6, 4), tasks, **params), expected)


# ------------------------------------------------------------------------------ shared


@pytest.mark.parametrize("method", METHODS)
def test_tensors_that_are_not_matrices_take_the_mean(method):
    # [1, 2] + 0.5 · ([2, 0] + [0, 4]) / 2 = [1.5, 3]
    tasks = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0, 4.0])}
    assert_close(merged_x(method, torch.tensor([1.0, 2.0]), tasks, 0.5), m(1.5, 3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lam", [0.6, -1.5])
def test_equal_per_task_coefficients_equal_the_shared_one(method, lam):
    tasks = random_tasks(6, 5)
    shared = merged_x(method, torch.zeros(6, 5), tasks, lam, **_small_common(method))
    per_task = {task: lam for task in tasks}
    assert_close(
        merged_x(method, torch.zeros(6, 5), tasks, per_task, **_small_common(method)), shared
    )


@pytest.mark.parametrize("method", METHODS)
def test_float64_is_computed_in_float64(method):
    tasks = {task: tau.double() for task, tau in random_tasks(6, 5).items()}
    merged = merged_x(method, torch.zeros(6, 5, dtype=torch.float64), tasks)
    single = merged_x(method, torch.zeros(6, 5), {t: v.float() for t, v in tasks.items()})
    assert merged.dtype == torch.float64
    assert not torch.equal(merged, single.double())  # the float32 result is not upcast
    assert_close(merged.float(), single, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("tsv", {"fraction": 0.0}, "fraction"),
        ("tsv", {"fraction": 1.5}, "fraction"),
        ("iso_cts", {"common": -0.1}, "common"),
        ("iso_c", {"fraction": 0.5}, "fraction"),
    ],
)
def test_bad_params_are_named(method, params, field):
    with pytest.raises(MergeInputError, match=f"{method} param '{field}'"):
        merged_x(method, torch.zeros(2, 2), {"a": torch.ones(2, 2)}, **params)


def _small_common(method: str) -> dict:
    return {"common": 0.4} if method == "iso_cts" else {}

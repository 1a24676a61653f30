"""Contract tests every registered merge method must pass (MERGING.md, "contract tests").

Methods registered for at most two task vectors (slerp) run every case on the last two tasks,
'b' and 'c' (see `tasks_for`); slerp's coefficient is its interpolation factor t, so its ends
(t = 0 gives θ_1, t = 1 gives θ_2) replace "λ = 0 gives θ0".
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge import get_method, list_methods
from workers.merge import merge as merge_method
from workers.merge.dare import drop_and_rescale
from workers.merge.ties import global_majority_sign, global_trim_thresholds

# Params that make every method do real work on tiny tensors (breadcrumbs' defaults keep
# floor(6 · 0.1) = 0 entries per row, which would make most properties hold trivially).
DEFAULT_PARAMS: dict[str, dict] = {
    "breadcrumbs": {"beta": 0.5, "gamma": 0.2},
    "dare": {"seed": 7},
    "tall_masks": {"task": "b"},
}
VARIANTS: list[tuple[str, dict]] = [
    ("ties", {"scope": "per_tensor", "merge": "max", "density": 0.5}),
    ("ties", {"merge": "sum", "density": 0.7}),
    ("dare", {"then": "ties", "p": 0.3, "seed": 1}),
    ("dare", {"then": "ties", "scope": "per_tensor", "density": 0.5}),
    ("breadcrumbs", {"then": "ties", "beta": 0.5, "gamma": 0.2}),
    ("consensus", {"use_ties": True, "k": 1}),
    ("consensus", {"lam": {"a": 0.2, "b": 0.5, "c": 0.3}}),
    ("tall_masks", {"task": "a", "use_ties": True}),
    ("della", {"density": 0.3, "epsilon": 0.5, "seed": 3}),
    # the default common 0.8 leaves no task-specific share on 4 × 6 and 3 × 5 with three tasks
    ("iso_cts", {"common": 0.25}),
]
CASES = [(name, DEFAULT_PARAMS.get(name, {})) for name in list_methods()] + VARIANTS
IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'default'}"
    for name, params in CASES
]
TASKS = ("a", "b", "c")


def make_base() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer1.weight": torch.randn(4, 6, generator=generator),
        "layer1.bias": torch.randn(4, generator=generator),
        "embed.weight": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "norm.scale": torch.randn(5, generator=generator, dtype=torch.float64),
    }


def make_task_vectors(base: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return {
        task: {
            name: torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
            for name, tensor in base.items()
        }
        for task in TASKS
    }


def make_statistics(kind: str) -> dict[str, dict[str, Tensor]]:
    """Seeded statistics of a data-aware method's kind over make_base()'s tensors."""
    generator = torch.Generator().manual_seed(2)
    stats: dict[str, dict[str, Tensor]] = {}
    for task in TASKS:
        stats[task] = {}
        for name, tensor in make_base().items():
            if kind == "fisher":
                stats[task][name] = torch.rand(tensor.shape, generator=generator)
            elif tensor.dim() == 2:
                rows = torch.randn(8, tensor.shape[1], generator=generator)
                stats[task][name] = rows.T @ rows / 8
    return stats


def merge(name: str, base, task_vectors, coefficient=1.0, **params):
    """workers.merge.merge, with seeded statistics for the methods that read them."""
    kind = get_method(name).statistics
    if kind is not None and "statistics" not in params:
        params["statistics"] = make_statistics(kind)
    return merge_method(name, base, task_vectors, coefficient, **params)


def _coefficient(per_task: bool = False):
    if per_task:
        return {"a": 0.7, "b": -0.4, "c": 1.3}
    return 0.6


def _clone(state):
    if isinstance(state, Tensor):
        return state.clone()
    return {key: _clone(value) for key, value in state.items()}


def _assert_same(left: dict[str, Tensor], right: dict[str, Tensor]) -> None:
    assert list(left) == list(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


@pytest.fixture()
def base() -> dict[str, Tensor]:
    return make_base()


def tasks_for(name: str, task_vectors: dict) -> dict:
    """The task vectors a method accepts: the last `max_tasks` in sorted order where it has one."""
    limit = get_method(name).max_tasks
    if limit is None:
        return task_vectors
    return {task: task_vectors[task] for task in sorted(task_vectors)[-limit:]}


@pytest.fixture()
def task_vectors(request, base) -> dict[str, dict[str, Tensor]]:
    """Tasks a, b, c, narrowed by `tasks_for` to what the test's method `name` accepts."""
    return tasks_for(request.node.callspec.params["name"], make_task_vectors(base))


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_pure_and_shaped_like_base(name, params, base, task_vectors):
    before_base, before_vectors = _clone(base), _clone(task_vectors)
    result = merge(name, base, task_vectors, _coefficient(), **params)
    _assert_same(base, before_base)
    for task in task_vectors:
        _assert_same(task_vectors[task], before_vectors[task])
    assert list(result) == list(base)
    inputs = [t.data_ptr() for t in base.values()]
    inputs += [t.data_ptr() for vector in task_vectors.values() for t in vector.values()]
    for key, tensor in result.items():
        assert tensor.dtype == base[key].dtype and tensor.shape == base[key].shape
        assert tensor.data_ptr() not in inputs, f"{key} aliases an input"
    assert any(not torch.equal(result[k], base[k]) for k in base), "the merge changed nothing"


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_zero_task_vectors_give_base(name, params, base, task_vectors):
    zeros = {
        task: {k: torch.zeros_like(v) for k, v in vector.items()}
        for task, vector in task_vectors.items()
    }
    _assert_same(merge(name, base, zeros, _coefficient(), **params), base)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_zero_coefficient_gives_base_or_is_ignored(name, params, base, task_vectors):
    result = merge(name, base, task_vectors, 0.0, **params)
    if name == "slerp":  # t = 0 is θ_1 = θ0 + τ_1 (the first name), t = 1 is θ_2
        first, second = sorted(task_vectors)
        _assert_same(result, merge("task_arithmetic", base, {first: task_vectors[first]}))
        _assert_same(
            merge(name, base, task_vectors, 1.0, **params),
            merge("task_arithmetic", base, {second: task_vectors[second]}),
        )
    elif get_method(name).uses_coefficient:
        _assert_same(result, base)
    else:
        _assert_same(result, merge(name, base, task_vectors, 1.0, **params))


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("per_task", [False, True])
def test_task_order_does_not_matter(name, params, per_task, base, task_vectors):
    if per_task and not get_method(name).per_task_coefficients:
        pytest.skip("the method takes one shared coefficient")
    reordered = {task: task_vectors[task] for task in reversed(list(task_vectors))}
    coefficient = _coefficient(per_task)
    _assert_same(
        merge(name, base, task_vectors, coefficient, **params),
        merge(name, base, reordered, coefficient, **params),
    )


def _trim_entries(name: str, params: dict, task_vectors):
    """The (task, tensor name, tensor) a global ties trim and election see for these params."""
    for task, vector in task_vectors.items():
        for key, tensor in vector.items():
            if name == "dare":
                tensor = drop_and_rescale(
                    tensor,
                    task=task,
                    name=key,
                    p=params.get("p", 0.5),
                    seed=params.get("seed", 0),
                )
            yield task, key, tensor


def _trim_stream(name: str, params: dict, task_vectors):
    """The (task, tensor) pairs a global ties trim sees for this method and params."""

    def stream():
        for task, _, tensor in _trim_entries(name, params, task_vectors):
            yield task, tensor

    return stream


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("per_task", [False, True])
def test_streaming_tensor_by_tensor_equals_in_memory(name, params, per_task, base, task_vectors):
    method = get_method(name)
    if per_task and not method.per_task_coefficients:
        pytest.skip("the method takes one shared coefficient")
    coefficient = _coefficient(per_task)
    extra = {}
    density = method.global_trim_density(method.validate_params(params))
    if density is not None:
        trim_coefficient = coefficient if method.uses_coefficient else 1.0
        stream = _trim_stream(name, params, task_vectors)
        extra["thresholds"] = global_trim_thresholds(stream, density, trim_coefficient)
        per_tensor: dict[str, dict[str, Tensor]] = {key: {} for key in base}
        for task, key, tensor in _trim_entries(name, params, task_vectors):
            per_tensor[key][task] = tensor
        extra["majority"] = global_majority_sign(
            per_tensor.values(), extra["thresholds"], trim_coefficient
        )
    streamed = {}
    for key in base:
        one_base = {key: base[key]}
        one_vectors = {task: {key: vector[key]} for task, vector in task_vectors.items()}
        streamed.update(merge(name, one_base, one_vectors, coefficient, **params, **extra))
    _assert_same(streamed, merge(name, base, task_vectors, coefficient, **params))


@pytest.mark.parametrize("name", list_methods())
def test_per_tensor_flag_matches_default_params(name):
    method = get_method(name)
    defaults = method.validate_params(DEFAULT_PARAMS.get(name, {}))
    assert method.per_tensor == (method.global_trim_density(defaults) is None)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_missing_tensor_is_named(name, params, base, task_vectors):
    del task_vectors["b"]["layer1.bias"]
    with pytest.raises(MergeInputError, match="task vector 'b' has no tensor 'layer1.bias'"):
        merge(name, base, task_vectors, _coefficient(), **params)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_extra_tensor_is_named(name, params, base, task_vectors):
    task_vectors["c"]["head.weight"] = torch.zeros(2)
    with pytest.raises(
        MergeInputError, match="task vector 'c' has tensor 'head.weight' that the base does not"
    ):
        merge(name, base, task_vectors, _coefficient(), **params)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_first_shape_mismatch_is_named(name, params, base, task_vectors):
    task_vectors["b"]["embed.weight"] = torch.zeros(5, 3)
    task_vectors["b"]["layer1.bias"] = torch.zeros(5)
    expected = (
        "task vector 'b' tensor 'layer1.bias' has shape (5,) but the base has (4,): "
        "build task vectors from the same base model"
    )
    with pytest.raises(MergeInputError, match=re.escape(expected)):
        merge(name, base, task_vectors, _coefficient(), **params)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_named(name, params, bad, base, task_vectors):
    task_vectors["c"]["embed.weight"][1, 2] = bad
    with pytest.raises(
        MergeInputError, match="task vector 'c' tensor 'embed.weight' has 1 NaN/Inf"
    ):
        merge(name, base, task_vectors, _coefficient(), **params)


@pytest.mark.parametrize("name", list_methods())
def test_per_task_coefficients_need_every_task(name, base, task_vectors):
    method = get_method(name)
    params = DEFAULT_PARAMS.get(name, {})
    if not method.uses_coefficient:
        pytest.skip("the coefficient is ignored")
    if not method.per_task_coefficients:
        with pytest.raises(MergeInputError, match=f"'{name}' takes one shared coefficient"):
            merge(name, base, task_vectors, {"a": 1.0, "b": 1.0, "c": 1.0}, **params)
        return
    with pytest.raises(MergeInputError, match="no value for task 'c'"):
        merge(name, base, task_vectors, {"a": 1.0, "b": 1.0}, **params)
    with pytest.raises(MergeInputError, match="task 'd' that has no task vector"):
        merge(name, base, task_vectors, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, **params)

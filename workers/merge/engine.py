"""The streaming merge engine: plan per tensor, then merge one tensor at a time (no I/O).

The engine reads θ0 and the task vectors through :class:`TensorSource` objects (files, or
dicts via :class:`StateSource`) and yields the merged backbone tensor by tensor, so peak memory
is one tensor of θ0 plus one of each task vector, not the model times the number of tasks:

    plan = plan_merge("ties", base_specs, task_specs, 1.0, {"scope": "per_tensor"})
    for name, tensor in merge_stream(plan, base, tasks): ...

Every tensor is merged by the registered method itself (``method.merge`` on a one-tensor
backbone), which is exact for every method whose steps are per tensor. A global ties trim
(``ties`` scope global, ``dare`` then ties, ``use_ties`` in consensus and tall_masks) first
computes each task's exact threshold with :func:`ties.global_trim_thresholds` over streamed
passes, then the whole backbone's election majority sign in one more pass. Methods registered
as linear (task arithmetic, weight averaging) and those naming a fused kernel (ties) run fused
kernels on float32 tensors (:mod:`workers.merge.kernels`) that read into reused buffers and
give the method's result without its temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge.backbone import Coefficient
from workers.merge.kernels import (
    Workspace,
    fused_linear,
    fused_sign_balance,
    fused_ties,
    global_thresholds_float32,
)
from workers.merge.registry import RegisteredMethod, get_method
from workers.merge.ties import global_sign_balance, global_trim_thresholds, majority_of
from workers.merge.validation import validate_coefficient

_SAME_BASE = "build task vectors from the same base model"


class TensorSource(Protocol):
    """Tensors by name, read on demand; ``out`` is a buffer to read into when given."""

    def read(self, name: str, out: Tensor | None = None) -> Tensor: ...


class StateSource:
    """An in-memory state dict as a :class:`TensorSource`."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state = state

    def read(self, name: str, out: Tensor | None = None) -> Tensor:
        tensor = self.state[name]
        return tensor if out is None else out.copy_(tensor)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, dtype and shape, known before any data is read."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def specs_of(state: Mapping[str, Tensor]) -> list[TensorSpec]:
    """The specs of an in-memory state dict, in its order."""
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in state.items()]


@dataclass(frozen=True)
class MergePlan:
    """What to merge and how, validated once before any tensor is read."""

    method: RegisteredMethod
    params: dict[str, Any]
    coefficient: Coefficient
    tasks: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]
    task_dtypes: dict[str, dict[str, torch.dtype]]
    trim_density: float | None

    def kernel(self, spec: TensorSpec) -> str | None:
        """The fused kernel for this tensor ("linear", "ties") or None: the method itself."""
        if spec.dtype != torch.float32 or any(
            self.task_dtypes[t][spec.name] != torch.float32 for t in self.tasks
        ):
            return None
        if self.method.linear_form(self.params) is not None:
            return "linear"
        return self.method.kernel


def plan_merge(
    method: str,
    base: Sequence[TensorSpec],
    task_vectors: Mapping[str, Sequence[TensorSpec]],
    coefficient: Coefficient = 1.0,
    params: Mapping[str, Any] | None = None,
) -> MergePlan:
    """Validate the method, its params, the coefficient and every name/shape; plan the merge."""
    registered = get_method(method)
    params = dict(params or {})
    validated = registered.validate_params(params)
    if registered.uses_coefficient:
        validate_coefficient(
            coefficient, task_vectors, method=method, per_task=registered.per_task_coefficients
        )
    task_dtypes = _check_specs(base, task_vectors)
    registered.check_task_count(len(task_vectors))
    return MergePlan(
        method=registered,
        params=params,
        coefficient=coefficient,
        tasks=tuple(sorted(task_vectors)),
        tensors=tuple(base),
        task_dtypes=task_dtypes,
        trim_density=registered.global_trim_density(validated),
    )


def _check_specs(
    base: Sequence[TensorSpec], task_vectors: Mapping[str, Sequence[TensorSpec]]
) -> dict[str, dict[str, torch.dtype]]:
    if not base:
        raise MergeInputError("the base backbone is empty: pass θ0 with at least one tensor")
    if not task_vectors:
        raise MergeInputError("no task vectors given: pass at least one")
    for spec in base:
        if not spec.dtype.is_floating_point:
            raise MergeInputError(
                f"base tensor '{spec.name}' is {spec.dtype}: merge only floating-point parameters"
            )
    dtypes: dict[str, dict[str, torch.dtype]] = {}
    for task, specs in task_vectors.items():
        by_name = {spec.name: spec for spec in specs}
        for spec in base:
            other = by_name.get(spec.name)
            if other is None:
                raise MergeInputError(
                    f"task vector '{task}' has no tensor '{spec.name}' that the base has: "
                    f"{_SAME_BASE}"
                )
            if other.shape != spec.shape:
                raise MergeInputError(
                    f"task vector '{task}' tensor '{spec.name}' has shape {other.shape} but the "
                    f"base has {spec.shape}: {_SAME_BASE}"
                )
            if not other.dtype.is_floating_point:
                raise MergeInputError(
                    f"task vector '{task}' tensor '{spec.name}' is {other.dtype}: {_SAME_BASE}"
                )
        extra = next((name for name in by_name if name not in {s.name for s in base}), None)
        if extra is not None:
            raise MergeInputError(
                f"task vector '{task}' has tensor '{extra}' that the base does not have: "
                f"{_SAME_BASE}"
            )
        dtypes[task] = {name: spec.dtype for name, spec in by_name.items()}
    return dtypes


def trim_thresholds(plan: MergePlan, tasks: Mapping[str, TensorSource]) -> dict[str, float] | None:
    """Each task's exact global ties threshold (streamed passes), or None when not needed."""
    if plan.trim_density is None:
        return None
    coefficient = _trim_coefficient(plan)
    float32 = all(dtype == torch.float32 for d in plan.task_dtypes.values() for dtype in d.values())
    if float32 and plan.method.trim_input is None:

        def read(task: str, index: int, out: Tensor) -> Tensor:
            return tasks[task].read(plan.tensors[index].name, out=out)

        shapes = [spec.shape for spec in plan.tensors]
        workspace = Workspace(max(spec.nbytes for spec in plan.tensors))
        return global_thresholds_float32(
            plan.tasks, shapes, read, plan.trim_density, coefficient, workspace
        )

    params = plan.method.validate_params(plan.params)

    def stream() -> Iterator[tuple[str, Tensor]]:
        for spec in plan.tensors:
            for task in plan.tasks:
                tensor = tasks[task].read(spec.name)
                yield task, _trim_input(plan, params, task, spec.name, tensor)

    return global_trim_thresholds(stream, plan.trim_density, coefficient)


def election_majority(
    plan: MergePlan, tasks: Mapping[str, TensorSource], thresholds: Mapping[str, float] | None
) -> float | None:
    """The whole backbone's ties majority sign (one more streamed pass), or None if not needed.

    Needs the plan's global ``thresholds`` (:func:`trim_thresholds`): the election counts the
    signs of the trimmed sums, tensor by tensor, exactly as the in-memory merge does.
    """
    if plan.trim_density is None:
        return None
    if thresholds is None:
        raise MergeInputError(
            "the global ties election needs the trim thresholds: compute them first with "
            "trim_thresholds(plan, tasks)"
        )
    coefficient = _trim_coefficient(plan)
    params = plan.method.validate_params(plan.params)
    workspace = Workspace(max(spec.nbytes for spec in plan.tensors))
    balance = 0
    for spec in plan.tensors:
        if plan.kernel(spec) == "ties":

            def read(task: str, out: Tensor, name: str = spec.name) -> Tensor:
                return tasks[task].read(name, out=out)

            balance += fused_sign_balance(
                plan.tasks, coefficient, spec.shape, read, workspace, thresholds=thresholds
            )
        else:
            by_task = {
                t: _trim_input(plan, params, t, spec.name, tasks[t].read(spec.name))
                for t in plan.tasks
            }
            balance += global_sign_balance([by_task], thresholds, coefficient)
    return majority_of(balance)


def _trim_coefficient(plan: MergePlan) -> Coefficient:
    """The coefficient the global trim sees: the plan's, or 1 for a method that ignores it."""
    return plan.coefficient if plan.method.uses_coefficient else 1.0


def _trim_input(plan: MergePlan, params: Any, task: str, name: str, tensor: Tensor) -> Tensor:
    """What the global ties trim sees of one task tensor (dare: the dropped vectors);
    ``params``: the plan's params, validated once by the caller."""
    if plan.method.trim_input is None:
        return tensor
    return plan.method.trim_input(tensor, task, name, params)


def merge_stream(
    plan: MergePlan,
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
    *,
    thresholds: Mapping[str, float] | None = None,
    majority: float | None = None,
    reuse_buffers: bool = False,
    statistics: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, merged tensor)`` in the plan's order, reading one tensor at a time.

    A global ties trim uses ``thresholds`` and ``majority`` (computed here when not given:
    :func:`trim_thresholds`, :func:`election_majority`). With ``reuse_buffers`` a yielded
    tensor may be overwritten by the next one: write or copy it before asking for the next
    (the sharded writer does). ``statistics``: a data-aware method's ``{task: {name: tensor}}``
    (``registry.register(statistics=...)``); each tensor's merge gets its own.
    """
    if plan.trim_density is not None and thresholds is None:
        thresholds = trim_thresholds(plan, tasks)
    if plan.trim_density is not None and majority is None:
        majority = election_majority(plan, tasks, thresholds)
    extra: dict[str, Any] = {}
    if thresholds is not None:
        extra = {"thresholds": dict(thresholds), "majority": majority}
    shared = Workspace(max(s.nbytes for s in plan.tensors)) if reuse_buffers else None
    for spec in plan.tensors:
        kernel = plan.kernel(spec)
        if kernel is not None:
            yield (
                spec.name,
                _fused(
                    kernel, plan, spec, base, tasks, shared or Workspace(), thresholds, majority
                ),
            )
            continue
        base_tensor = base.read(spec.name)
        vectors = {task: {spec.name: tasks[task].read(spec.name)} for task in plan.tasks}
        if statistics is not None:
            extra["statistics"] = {
                task: {spec.name: stats[spec.name]} if spec.name in stats else {}
                for task, stats in statistics.items()
            }
        merged = plan.method.merge(
            {spec.name: base_tensor}, vectors, plan.coefficient, **plan.params, **extra
        )
        del base_tensor, vectors
        yield spec.name, merged.pop(spec.name)


def _fused(
    kernel: str,
    plan: MergePlan,
    spec: TensorSpec,
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
    workspace: Workspace,
    thresholds: Mapping[str, float] | None,
    majority: float | None,
) -> Tensor:
    def read(task: str, out: Tensor) -> Tensor:
        return (tasks[task] if task else base).read(spec.name, out=out)

    if kernel == "ties":
        params = plan.method.validate_params(plan.params)
        merged = fused_ties(
            plan.tasks,
            plan.coefficient,
            spec.shape,
            read,
            workspace,
            density=params.density,
            merge=params.merge,
            thresholds=thresholds,
            majority=majority,
        )
    else:
        form = plan.method.linear_form(plan.params)
        assert form is not None  # kernel() chose "linear" from it
        merged = fused_linear(form, plan.tasks, plan.coefficient, spec.shape, read, workspace)
    # NaN/Inf in any input reaches the result; a finite sum rules them out in one cheap pass.
    if not torch.isfinite(merged.sum()) and not bool(torch.isfinite(merged).all()):
        raise MergeInputError(_non_finite_source(spec.name, plan.tasks, base, tasks))
    return merged


def _non_finite_source(
    name: str, order: Sequence[str], base: TensorSource, tasks: Mapping[str, TensorSource]
) -> str:
    """The error path only: re-read the inputs of ``name`` to say which one holds NaN/Inf."""
    for task in order:
        if not bool(torch.isfinite(tasks[task].read(name)).all()):
            return (
                f"task vector '{task}' tensor '{name}' holds NaN/Inf values (a diverged "
                "fine-tune produces these): rebuild that task vector from finite weights"
            )
    return (
        f"base tensor '{name}' holds NaN/Inf values (or the merge overflowed): "
        "check the base model's weights"
    )


def _specs(vector: Mapping[str, Tensor]) -> list[TensorSpec]:
    """A task vector's specs; one that computes its tensors (``specs()``) is not read."""
    specs = getattr(vector, "specs", None)
    if specs is not None:
        return [TensorSpec(name, dtype, tuple(shape)) for name, dtype, shape in specs()]
    return specs_of(vector)


def merge_state(
    method: str,
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    coefficient: Coefficient = 1.0,
    **params: Any,
) -> dict[str, Tensor]:
    """``workers.merge.merge`` for any task vectors; the merged state is returned.

    Plain dicts are already in memory and merge there. Task vectors that compute their tensors
    when read (LoRA factors, ``workers.adapters.LoraDelta``) go through the streaming engine,
    which never asks for more than one tensor of each at once, so none is ever dense in full.
    """
    if all(isinstance(vector, dict) for vector in task_vectors.values()):
        return get_method(method).merge(base, task_vectors, coefficient, **params)
    statistics = params.pop("statistics", None)
    plan = plan_merge(
        method, specs_of(base), {t: _specs(v) for t, v in task_vectors.items()}, coefficient, params
    )
    sources = {
        task: vector if hasattr(vector, "read") else StateSource(vector)
        for task, vector in task_vectors.items()
    }
    return dict(merge_stream(plan, StateSource(base), sources, statistics=statistics))

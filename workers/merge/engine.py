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
kernels (:mod:`workers.merge.kernels`) that read into reused buffers and give the method's
result without its temporaries, on float32 tensors and on half-precision ones (read into
float32, the result cast back, as the methods compute).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge.backbone import Coefficient, finish
from workers.merge.blocks import (
    BLOCK_BYTES,
    check_finite,
    linear_by_rows,
    pieces,
    read_float32,
    read_rows_float32,
    row_blocks,
    ties_by_rows,
)
from workers.merge.kernels import (
    Workspace,
    fused_linear,
    fused_sign_balance,
    fused_ties,
    global_thresholds_float32,
)
from workers.merge.plan import (
    KERNEL_DTYPES,
    MergePlan,
    StateSource,
    TensorSource,
    TensorSpec,
    ZeroSource,
    plan_merge,
    specs_of,
)
from workers.merge.registry import get_method
from workers.merge.ties import global_sign_balance, global_trim_thresholds, majority_of

__all__ = [
    "MergePlan",
    "StateSource",
    "TensorSource",
    "TensorSpec",
    "ZeroSource",
    "election_majority",
    "merge_state",
    "merge_stream",
    "plan_merge",
    "scaled_stream",
    "specs_of",
    "trim_thresholds",
]


def scaled_stream(
    base_specs: Sequence[TensorSpec], base: TensorSource, delta: TensorSource, lam: float
) -> Iterator[tuple[str, Tensor]]:
    """θ0 + λ·Δ tensor by tensor, computed as every method finishes (``backbone.finish``):
    the merge at a shared λ of a method registered ``scales_delta``, whose Δ is its merge at
    λ = 1 onto a zero θ0 held in the compute dtype."""
    for spec in base_specs:
        blocks = row_blocks(spec, [base, delta])
        if blocks is None:
            yield spec.name, finish(base.read(spec.name), delta.read(spec.name), lam)
            continue
        merged = torch.empty(spec.shape, dtype=spec.dtype)
        for start, stop in blocks:  # elementwise: block by block is the whole tensor's result
            rows = finish(
                base.read_rows(spec.name, start, stop), delta.read_rows(spec.name, start, stop), lam
            )
            merged[start:stop].copy_(rows)
        yield spec.name, merged


def trim_thresholds(plan: MergePlan, tasks: Mapping[str, TensorSource]) -> dict[str, float] | None:
    """Each task's exact global ties threshold (streamed passes), or None when not needed."""
    if plan.trim_density is None:
        return None
    coefficient = _trim_coefficient(plan)
    kernel = all(dtype in KERNEL_DTYPES for d in plan.task_dtypes.values() for dtype in d.values())
    if kernel and plan.method.trim_input is None:
        parts = pieces(plan, list(tasks.values()))
        shapes = [shape for _, _, shape in parts]
        workspace = Workspace(min(BLOCK_BYTES, max(spec.nbytes for spec in plan.tensors)))

        def read(task: str, index: int, out: Tensor) -> Tensor:
            name, rows, _ = parts[index]
            dtype = plan.task_dtypes[task][name]
            if rows is None:
                return read_float32(tasks[task], name, dtype, out, workspace)
            return read_rows_float32(tasks[task], name, dtype, rows, out, workspace)

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
    workspace = Workspace(min(BLOCK_BYTES, max(spec.nbytes for spec in plan.tensors)))
    balance = 0
    for spec in plan.tensors:
        if plan.kernel(spec) == "ties":
            for name, rows, shape in pieces(plan, list(tasks.values()), [spec]):

                def read(task: str, out: Tensor, name: str = name, rows: Any = rows) -> Tensor:
                    dtype = plan.task_dtypes[task][name]
                    if rows is None:
                        return read_float32(tasks[task], name, dtype, out, workspace)
                    return read_rows_float32(tasks[task], name, dtype, rows, out, workspace)

                balance += fused_sign_balance(
                    plan.tasks, coefficient, shape, read, workspace, thresholds=thresholds
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
    largest = max(s.nbytes for s in plan.tensors)
    shared = Workspace(min(largest, BLOCK_BYTES)) if reuse_buffers else None
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
        source = tasks[task] if task else base
        dtype = plan.task_dtypes[task][spec.name] if task else spec.dtype
        return read_float32(source, spec.name, dtype, out, workspace)

    if kernel == "ties":
        params = plan.method.validate_params(plan.params)
        blocks = row_blocks(spec, [base, *tasks.values()])
        if blocks is not None:  # a large tensor: passes over blocks of rows, exact
            return ties_by_rows(
                plan, spec, base, tasks, workspace, blocks, params, thresholds, majority
            )
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
        blocks = row_blocks(spec, [base, *tasks.values()])
        if blocks is not None:  # elementwise: a large tensor is merged a block of rows at a time
            return linear_by_rows(form, plan, spec, base, tasks, workspace, blocks)
        merged = fused_linear(form, plan.tasks, plan.coefficient, spec.shape, read, workspace)
    check_finite(merged, spec.name, plan.tasks, base, tasks)
    return merged if merged.dtype == spec.dtype else merged.to(spec.dtype)


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

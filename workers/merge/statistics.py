"""Per-task data statistics that data-aware merge methods read (regmean, fisher): checks.

A data-aware method gets ``statistics={task: {tensor name: tensor}}`` as an internal param:

- ``gram``: for a 2-D weight W (out × in) of a linear layer y = x Wᵀ, the (in × in) Gram
  matrix XᵀX of that layer's inputs, averaged per input row (token, for a sequence model);
- ``fisher``: the diagonal Fisher of a parameter, the shape of the parameter.

A tensor with no statistic for some task is merged by the method's fallback (its docstring
says which). The statistics are computed by ``workers.finetune.statistics``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    finish,
    prepare_vectors,
    split_coefficient,
    sum_tasks,
    task_names,
)

Statistics = Mapping[str, Mapping[str, Tensor]]


def expected_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The statistic's shape for a parameter of ``shape``; None where the kind has none."""
    if kind == "fisher":
        return shape
    return (shape[1], shape[1]) if len(shape) == 2 else None


def validate_statistics(
    method: str,
    kind: str,
    base: Mapping[str, Tensor],
    task_vectors: Mapping[str, object],
    statistics: Statistics | None,
) -> None:
    """Raise MergeInputError unless every task has statistics that fit θ0's tensors.

    Statistics of tensors that are not in ``base`` are ignored (a streamed merge passes one
    tensor of θ0 with the statistics of the whole model).
    """
    advice = (
        f"'{method}' reads each task's {kind} statistics: run it through `mergeline run`, "
        f"which computes them, or pass statistics={{task: {{name: tensor}}}}"
    )
    if statistics is None:
        raise MergeInputError(f"no statistics given: {advice}")
    for task in task_vectors:
        if task not in statistics:
            raise MergeInputError(f"no {kind} statistics for task '{task}': {advice}")
        for name, tensor in statistics[task].items():
            if name not in base:
                continue
            shape = expected_shape(kind, tuple(base[name].shape))
            what = f"the {kind} statistic of task '{task}' tensor '{name}'"
            if shape is None or tuple(tensor.shape) != shape:
                wanted = "none (not a 2-D weight)" if shape is None else str(shape)
                raise MergeInputError(
                    f"{what} has shape {tuple(tensor.shape)}, expected {wanted}: compute the "
                    "statistics from the same base model"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise MergeInputError(f"{what} holds NaN/Inf values: recompute the statistics")
            if kind == "fisher" and bool((tensor < 0).any()):
                raise MergeInputError(f"{what} has negative entries: a diagonal Fisher is ≥ 0")


def for_tensor(statistics: Statistics, tasks: list[str], name: str) -> dict[str, Tensor] | None:
    """Each of ``tasks``' statistic of one tensor, or None unless every one of them has it."""
    if any(name not in statistics[task] for task in tasks):
        return None
    return {task: statistics[task][name] for task in tasks}


def merge_with_statistics(
    method: str,
    kind: str,
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    statistics: Statistics | None,
    combine: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor],
) -> StateDict:
    """θ0 + λ τ_merged per tensor, where τ_merged = ``combine({task: τ_t}, {task: statistic})``
    for a tensor every task has a statistic of, else the mean of the τ_t (the fine-tuned
    models' mean). Per-task coefficients scale each τ_t first, as in task arithmetic."""
    validate_statistics(method, kind, base, task_vectors, statistics)
    assert statistics is not None
    tasks = task_names(task_vectors)
    scales, lam = split_coefficient(coefficient, tasks)
    prepared = prepare_vectors(task_vectors, scales)
    merged = {}
    for name in base:
        found = for_tensor(statistics, tasks, name)
        if found is None:
            delta = sum_tasks(prepared, name) / len(tasks)
        else:
            delta = combine({task: prepared[task][name] for task in tasks}, found)
        merged[name] = finish(base[name], delta, lam)
    return merged

"""Checks run once at the merge entry point, so methods can assume well-formed inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch
from torch import Tensor

from storage.errors import MergeInputError

_SAME_BASE = "build task vectors from the same base model"


def _shape(tensor: Tensor) -> str:
    return str(tuple(tensor.shape))


def _check_finite(tensor: Tensor, what: str) -> None:
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise MergeInputError(
            f"{what} has {bad} NaN/Inf value(s): re-extract it from finite weights "
            "(a diverged fine-tune produces these)"
        )


def validate_task_vectors(base: Mapping[str, Tensor], task_vectors: Mapping[str, object]) -> None:
    """Raise MergeInputError unless every task vector matches θ0's names and shapes, all finite.

    The message names the first offending tensor (in θ0's order) and its task.
    """
    if not isinstance(base, Mapping) or not base:
        raise MergeInputError("the base backbone is empty: pass θ0 as a non-empty dict of tensors")
    for name, tensor in base.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
            raise MergeInputError(
                f"base tensor '{name}' is {kind}: merge only floating-point parameters"
            )
        _check_finite(tensor, f"base tensor '{name}'")
    if not isinstance(task_vectors, Mapping) or not task_vectors:
        raise MergeInputError("no task vectors given: pass at least one {task_name: {name: τ}}")
    for task, vector in task_vectors.items():
        if not isinstance(task, str) or not task:
            raise MergeInputError(f"task name {task!r} is not a non-empty string: name each task")
        if not isinstance(vector, Mapping):
            raise MergeInputError(f"task vector '{task}' is not a dict: pass {{name: tensor}}")
        for name in base:
            if name not in vector:
                raise MergeInputError(
                    f"task vector '{task}' has no tensor '{name}' that the base has: {_SAME_BASE}"
                )
        for name in vector:
            if name not in base:
                raise MergeInputError(
                    f"task vector '{task}' has tensor '{name}' that the base does not have: "
                    f"{_SAME_BASE}"
                )
        for name, base_tensor in base.items():
            tensor = vector[name]
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise MergeInputError(
                    f"task vector '{task}' tensor '{name}' is not a floating-point tensor: "
                    f"{_SAME_BASE}"
                )
            if tensor.shape != base_tensor.shape:
                raise MergeInputError(
                    f"task vector '{task}' tensor '{name}' has shape {_shape(tensor)} but the "
                    f"base has {_shape(base_tensor)}: {_SAME_BASE}"
                )
    for task, vector in task_vectors.items():
        for name in base:
            _check_finite(vector[name], f"task vector '{task}' tensor '{name}'")  # type: ignore[index]


def validate_number(value: object, what: str) -> None:
    """Raise MergeInputError unless value is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise MergeInputError(f"{what} is {value!r}: use a finite number")


def validate_task_count(count: int, *, method: str, min_tasks: int, max_tasks: int | None) -> None:
    """Raise MergeInputError unless the method accepts `count` task vectors."""
    if max_tasks == min_tasks and count != min_tasks:
        raise MergeInputError(
            f"merge method '{method}' takes exactly {min_tasks} task vectors, got {count}: "
            f"merge {min_tasks} tasks with it, or choose another method"
        )
    if count < min_tasks:
        raise MergeInputError(
            f"merge method '{method}' takes at least {min_tasks} task vectors, got {count}: "
            "add tasks, or choose another method"
        )
    if max_tasks is not None and count > max_tasks:
        raise MergeInputError(
            f"merge method '{method}' takes at most {max_tasks} task vectors, got {count}: "
            "drop tasks, or choose another method"
        )


def validate_coefficient(
    coefficient: object, tasks: Mapping[str, object], *, method: str, per_task: bool
) -> None:
    """A finite float, or (when the method allows it) one finite float per task, no more."""
    if not isinstance(coefficient, Mapping):
        validate_number(coefficient, f"the coefficient of '{method}'")
        return
    if not per_task:
        raise MergeInputError(
            f"merge method '{method}' takes one shared coefficient, not one per task: pass a float "
            "(task_arithmetic takes per-task coefficients)"
        )
    for task in tasks:
        if task not in coefficient:
            raise MergeInputError(
                f"the coefficients have no value for task '{task}': give one per task vector "
                "(0.0 leaves a task out)"
            )
        validate_number(coefficient[task], f"the coefficient of task '{task}'")
    for task in coefficient:
        if task not in tasks:
            raise MergeInputError(
                f"the coefficients name task '{task}' that has no task vector: remove it"
            )

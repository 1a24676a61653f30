"""Shared helpers over backbones (`dict[str, Tensor]`) used by every merge method.

Methods compute in float32 (float64 when a tensor is float64), visit tasks in sorted name order
so the task order never changes a result, and cast back to the base's dtype at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]
TaskVectors = Mapping[str, Mapping[str, Tensor]]
Coefficient = float | Mapping[str, float]


def task_names(task_vectors: Mapping[str, object]) -> list[str]:
    """Task names in the order every method visits them (sorted, so order never matters)."""
    return sorted(task_vectors)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (exact for half and bfloat16 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of a tensor of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_compute(tensor: Tensor) -> Tensor:
    """The tensor in its compute dtype; may return the input itself, so never modify in place."""
    return tensor.to(compute_dtype(tensor))


def split_coefficient(
    coefficient: Coefficient, tasks: Iterable[str]
) -> tuple[dict[str, float] | None, float]:
    """Per-task α_t (scale each τ_t before the method's steps, then λ = 1) or a shared λ.

    Returns `(scales, lam)`: `scales` is None for a shared coefficient, applied at the end.
    """
    if isinstance(coefficient, Mapping):
        return {task: float(coefficient[task]) for task in tasks}, 1.0
    return None, float(coefficient)


def prepare_vectors(
    task_vectors: TaskVectors,
    scales: Mapping[str, float] | None,
    transform: Callable[[str, str, Tensor], Tensor] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Task vectors in compute dtype, optionally transformed per (task, name), then scaled by α_t.

    Scaling comes last so that a streamed pass applying the same steps sees identical values.
    """
    prepared: dict[str, dict[str, Tensor]] = {}
    for task in task_names(task_vectors):
        prepared[task] = {}
        for name, tensor in task_vectors[task].items():
            value = to_compute(tensor)
            if transform is not None:
                value = transform(task, name, value)
            if scales is not None:
                value = value * scales[task]
            prepared[task][name] = value
    return prepared


def stack_tasks(prepared: Mapping[str, Mapping[str, Tensor]], name: str) -> Tensor:
    """One tensor's values across tasks as a (T, ...) tensor, tasks in sorted order."""
    values = [prepared[task][name] for task in task_names(prepared)]
    dtype = compute_dtype(*values)
    return torch.stack([value.to(dtype) for value in values])


def sum_tasks(prepared: Mapping[str, Mapping[str, Tensor]], name: str) -> Tensor:
    """Σ_t τ_t for one tensor, summed in sorted task order (a new tensor)."""
    values = [prepared[task][name] for task in task_names(prepared)]
    total = torch.zeros_like(values[0], dtype=compute_dtype(*values))
    for value in values:
        total = total + value
    return total


def finish(base: Tensor, merged: Tensor, lam: float = 1.0) -> Tensor:
    """θ0 + λ · τ_merged, computed in compute dtype and cast back to the base's dtype."""
    dtype = compute_dtype(base, merged)
    return (base.to(dtype) + merged.to(dtype) * lam).to(base.dtype)

"""A merge planned before any data is read: tensor specs, sources and the validated plan.

:func:`plan_merge` checks the method, its params, the coefficient and every name, shape and
dtype from the inputs' headers (:class:`TensorSpec`), so a streamed merge fails before it reads
a byte. Inputs are :class:`TensorSource` objects: files (``storage.shards``), in-memory dicts
(:class:`StateSource`) or zeros (:class:`ZeroSource`, the θ0 of a merge's Δ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge.backbone import Coefficient
from workers.merge.registry import RegisteredMethod, get_method
from workers.merge.validation import validate_coefficient

_SAME_BASE = "build task vectors from the same base model"
KERNEL_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


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

    def read_rows(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        tensor = self.state[name][start:stop]
        return tensor if out is None else out.copy_(tensor)


class ZeroSource:
    """Zeros under every name of ``specs``: the θ0 of a merge's Δ (see :func:`scaled_stream`)."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = {spec.name: spec for spec in specs}

    def read(self, name: str, out: Tensor | None = None) -> Tensor:
        spec = self.specs[name]
        return torch.zeros(spec.shape, dtype=spec.dtype) if out is None else out.zero_()

    def read_rows(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        spec = self.specs[name]
        shape = (stop - start, *spec.shape[1:])
        return torch.zeros(shape, dtype=spec.dtype) if out is None else out.zero_()


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
        """The fused kernel for this tensor ("linear", "ties") or None: the method itself.

        The kernels compute in float32; half-precision inputs are converted as they are read
        (exactly) and the result cast back, as the methods themselves compute."""
        dtypes = {spec.dtype} | {self.task_dtypes[t][spec.name] for t in self.tasks}
        if not dtypes <= KERNEL_DTYPES:
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

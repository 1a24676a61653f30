"""SLERP: spherical linear interpolation between two fine-tuned models, tensor by tensor.

As mergekit defines it (arcee-ai/mergekit, merge_methods/slerp.py; Shoemake 1985, "Animating
rotation with quaternion curves", SIGGRAPH, for the interpolation itself).

Exactly two task vectors, taken in sorted name order: θ_1 = θ0 + τ_1 (the first name) and
θ_2 = θ0 + τ_2. The coefficient is the factor t (shared only; MERGING.md's default is 0.5, pass
it: `merge`'s signature default of 1.0 gives θ_2). Per tensor, on flattened copies of θ_1 and θ_2
each divided by its norm (left as is when the norm is at most 1e-8, as mergekit), cos ω = their
dot product. If |cos ω| > 0.9995 (nearly colinear), θ = (1 − t) θ_1 + t θ_2; else
θ = sin((1 − t) ω) / sin ω · θ_1 + sin(t ω) / sin ω · θ_2, on the unnormalised tensors.

Choices where MERGING.md is silent:
- The interpolation runs between the two fine-tuned models; mergekit's slerp runs between its
  base model and one other, so θ_1 here stands where mergekit's base model stands (t = 0).
- t = 0 gives θ_1 and t = 1 gives θ_2 exactly, in both branches. Equal tensors are
  interpolated linearly even when their norm is below the floor (mergekit would take them as
  orthogonal and scale them), so zero task vectors give θ0 exactly.
- t outside [0, 1] extrapolates along the same arc or line; neither is refused (nor in
  mergekit), so a coefficient grid may reach past the two models.
- Every tensor (1-D and 0-D included) is one flattened vector, as mergekit; its per-layer
  gradients of t are not offered (one t for the whole backbone).
- Arithmetic runs in the compute dtype (float64 for float64 tensors), not mergekit's float32.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from workers.merge.backbone import Coefficient, StateDict, TaskVectors, compute_dtype, task_names
from workers.merge.registry import register

COLINEAR = 0.9995
"""|cos ω| above which the two tensors count as colinear and are interpolated linearly."""
_NORM_FLOOR = 1e-8


class SlerpParams(BaseModel):
    """slerp takes no params beyond the coefficient t."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _direction(tensor: Tensor) -> Tensor:
    norm = float(torch.linalg.vector_norm(tensor))
    return tensor.flatten() / norm if norm > _NORM_FLOOR else tensor.flatten()


def slerp_tensors(first: Tensor, second: Tensor, t: float) -> Tensor:
    """The spherical (or, when nearly colinear, linear) interpolation from `first` to `second`."""
    cosine = float(torch.dot(_direction(first), _direction(second)))
    if abs(cosine) > COLINEAR or torch.equal(first, second):
        return torch.lerp(first, second, t)  # exact at t = 0, t = 1 and when first == second
    omega = math.acos(cosine)
    sin_omega = math.sin(omega)
    return first * (math.sin((1 - t) * omega) / sin_omega) + second * (
        math.sin(t * omega) / sin_omega
    )


@register("slerp", params_model=SlerpParams, per_task_coefficients=False, min_tasks=2, max_tasks=2)
def slerp(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: SlerpParams,
) -> StateDict:
    """Per tensor, θ_1 = θ0 + τ_1 slerped towards θ_2 = θ0 + τ_2 by t = the coefficient."""
    t = float(coefficient)  # type: ignore[arg-type]
    first, second = (task_vectors[task] for task in task_names(task_vectors))
    merged: StateDict = {}
    for name, base_tensor in base.items():
        dtype = compute_dtype(base_tensor, first[name], second[name])
        origin = base_tensor.to(dtype)
        ends = (origin + first[name].to(dtype), origin + second[name].to(dtype))
        merged[name] = slerp_tensors(*ends, t).to(base_tensor.dtype)
    return merged

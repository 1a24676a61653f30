"""Fisher merging: each parameter averaged with the tasks' diagonal Fisher as weights.

Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging".

θ* = Σ_t F̂_t ∘ θ_t / Σ_t F̂_t element-wise, with F̂_t = max(F_t, ``floor``): the floor is applied
to each task's Fisher, as the reference code does, so the denominator is at least T · floor and
an entry no task's data reached (all F_t = 0) gets the plain mean. F_t (``statistics``, kind
``fisher``) is the empirical diagonal Fisher of task t's fine-tuned model, E[(∂ log p / ∂θ)²]
over ``n`` of its training rows. The weights F̂_t / Σ F̂ sum to one, so θ* − θ0 =
Σ_t (F̂_t / Σ F̂) ∘ τ_t exactly and the method is written on task vectors: θ = θ0 + λ τ_merged
(λ = 1 is the paper's merge). Per-task coefficients scale each τ_t first (the paper's
per-model λ_t scale the Fisher instead; a per-task α_t here is the task-arithmetic kind).
Tensors without a Fisher for every task: the mean of the fine-tuned models.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    compute_dtype,
)
from workers.merge.registry import register
from workers.merge.statistics import Statistics, merge_with_statistics


class FisherParams(BaseModel):
    """Params of `fisher` (MERGING.md): the Fisher ``floor``, rows ``n``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    floor: float = Field(1e-6, gt=0)
    n: int = Field(256, gt=0)


def fisher_delta(taus: dict[str, Tensor], fishers: dict[str, Tensor], floor: float) -> Tensor:
    """Σ_t F̂_t τ_t / Σ_t F̂_t for one tensor, tasks in sorted order."""
    tasks = sorted(taus)
    dtype = compute_dtype(*taus.values())
    weighted = torch.zeros_like(taus[tasks[0]], dtype=dtype)
    total = torch.zeros_like(weighted)
    for task in tasks:
        weight = fishers[task].to(dtype).clamp_min(floor)
        weighted += weight * taus[task].to(dtype)
        total += weight
    return weighted / total


@register(
    "fisher",
    params_model=FisherParams,
    internal_params=("statistics",),
    statistics="fisher",
    scales_delta=True,
)
def fisher(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: FisherParams,
    statistics: Statistics | None = None,
) -> StateDict:
    """θ0 + λ Σ_t (F̂_t / Σ F̂) τ_t per entry; the mean where a task has no Fisher."""
    return merge_with_statistics(
        "fisher",
        "fisher",
        base,
        task_vectors,
        coefficient,
        statistics,
        lambda taus, fishers: fisher_delta(taus, fishers, params.floor),
    )

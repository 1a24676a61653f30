"""Model Breadcrumbs: drop outliers and small perturbations row by row, then merge.

Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks" (ECCV).

For each τ_t, tensor and row along the last dimension (a 1-D tensor is one row) of n entries:
rank entries by |value| (equal values: the earlier position ranks first), zero the top
floor(n·gamma) (outliers; a count of 0 removes none), keep the next floor(n·beta), zero the rest.
Then `then: task_arithmetic` (θ0 + λ Σ τ̂_t) or `then: ties` (TIES sign election and disjoint
mean on the masked vectors, with no further trim; the masks are per row, so zero sums take the
tensor's majority sign, as ties `scope: per_tensor` does). Per-task coefficients scale each
τ_t by α_t first, then λ = 1.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    finish,
    prepare_vectors,
    split_coefficient,
    stack_tasks,
    sum_tasks,
    task_names,
)
from workers.merge.registry import register
from workers.merge.ties import elect_and_merge


class BreadcrumbsParams(BaseModel):
    """Params of `breadcrumbs` (MERGING.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    beta: float = Field(0.1, ge=0, lt=1)
    gamma: float = Field(0.01, ge=0, lt=1)
    then: Literal["task_arithmetic", "ties"] = "task_arithmetic"


def fraction_count(n: int, fraction: float) -> int:
    """floor(n · fraction), exact for the decimal the user wrote (0.29 · 100 is 29)."""
    return math.floor(Decimal(str(fraction)) * n)


def breadcrumbs_mask(tensor: Tensor, beta: float, gamma: float) -> Tensor:
    """Kept entries of one tensor: per row, |value| ranks floor(n·gamma) .. + floor(n·beta)."""
    if tensor.numel() == 0:
        return torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
    n = tensor.shape[-1] if tensor.dim() else 1
    rows = tensor.detach().reshape(-1, n).abs()
    order = rows.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=tensor.device).expand_as(order))
    outliers = fraction_count(n, gamma)
    kept = (ranks >= outliers) & (ranks < outliers + fraction_count(n, beta))
    return kept.reshape(tensor.shape)


@register("breadcrumbs", params_model=BreadcrumbsParams, scales_delta=True)
def breadcrumbs(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: BreadcrumbsParams,
) -> StateDict:
    """θ0 + λ · merge of the breadcrumbs-masked task vectors."""
    scales, lam = split_coefficient(coefficient, task_names(task_vectors))

    def mask(task: str, name: str, value: Tensor) -> Tensor:
        keep = breadcrumbs_mask(value, params.beta, params.gamma)
        return torch.where(keep, value, torch.zeros_like(value))

    prepared = prepare_vectors(task_vectors, scales, mask)
    merged: dict[str, Tensor] = {}
    for name in base:
        if params.then == "ties":
            merged[name] = elect_and_merge(stack_tasks(prepared, name), "mean")
        else:
            merged[name] = sum_tasks(prepared, name)
    return {name: finish(base[name], merged[name], lam) for name in base}

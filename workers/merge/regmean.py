"""RegMean: merge each linear layer by least squares on the tasks' layer inputs.

Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models".

For a linear layer y = x Wᵀ (W is out × in, as torch stores it) with task input Gram matrices
G_t = X_tᵀ X_t (``statistics``, kind ``gram``: averaged per input row), the merged weight
minimises Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖², i.e. W*ᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ, with
G̃_t = α G_t + (1 − α) diag(G_t): ``alpha`` scales the off-diagonal entries down, as the paper
does to keep the solve well conditioned (default 0.9; α = 1 is the plain least squares,
α = 0 makes every input coordinate independent: a per-column weighted mean). Since
W_t = W0 + τ_t and the G̃_t sum to Σ_t G̃_t, W* − W0 = (Σ_t G̃_t)⁻¹ Σ_t G̃_t τ_tᵀ exactly, so the
method is written on task vectors: θ = θ0 + λ τ_merged (λ = 1 is the paper's merge; other λ
scale it as for every method). Per-task coefficients scale each τ_t first, as in task
arithmetic. A singular Σ_t G̃_t (an input that is always zero) is solved
in the least-squares sense (minimum norm, ``torch.linalg.lstsq``), in float64.

Tensors without a Gram matrix for every task (biases, norms, embeddings, a layer no input
reached) take the mean of the fine-tuned models, θ0 + λ · (1/T) Σ_t τ_t, as the reference code
does for non-linear parameters. ``n`` is how many training rows of each task the statistics
were computed on (the pipeline's; it does not enter the algebra).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
)
from workers.merge.registry import register
from workers.merge.statistics import Statistics, merge_with_statistics


class RegMeanParams(BaseModel):
    """Params of `regmean` (MERGING.md): off-diagonal scale ``alpha``, rows ``n``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    alpha: float = Field(0.9, ge=0, le=1)
    n: int = Field(256, gt=0)


def regularized(gram: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G): the off-diagonal entries scaled by α, in float64."""
    gram = gram.to(torch.float64)
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_delta(taus: dict[str, Tensor], grams: dict[str, Tensor], alpha: float) -> Tensor:
    """τ* = ((Σ_t G̃_t)⁻¹ Σ_t G̃_t τ_tᵀ)ᵀ for one (out × in) weight, tasks in sorted order."""
    tasks = sorted(taus)
    dtype = taus[tasks[0]].dtype
    total = torch.zeros_like(grams[tasks[0]], dtype=torch.float64)
    rhs = torch.zeros(taus[tasks[0]].shape[::-1], dtype=torch.float64)
    for task in tasks:
        tilde = regularized(grams[task], alpha)
        total += tilde
        rhs += tilde @ taus[task].to(torch.float64).T
    if not bool(rhs.any()):
        return torch.zeros_like(taus[tasks[0]])
    solution = torch.linalg.lstsq(total, rhs, driver="gelsd").solution
    return solution.T.to(dtype)


@register(
    "regmean",
    params_model=RegMeanParams,
    internal_params=("statistics",),
    statistics="gram",
    scales_delta=True,
)
def regmean(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: RegMeanParams,
    statistics: Statistics | None = None,
) -> StateDict:
    """θ0 + λ τ*: least squares per linear layer on the Gram matrices, mean elsewhere."""
    return merge_with_statistics(
        "regmean",
        "gram",
        base,
        task_vectors,
        coefficient,
        statistics,
        lambda taus, grams: regmean_delta(taus, grams, params.alpha),
    )

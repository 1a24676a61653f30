"""Iso-C: isotropic merging in the common subspace: flatten the spectrum of the summed update.

Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces"; reference code github.com/danielm1405/iso-merging (``iso_c``).

For each 2-D tensor: Δ = Σ_t τ_t = U Σ Vᵀ; every singular value is replaced by their mean σ̄, so
τ_merged = σ̄ U Vᵀ (all directions of Δ equally strong); θ = θ0 + λ τ_merged. SVDs run in float32
(float64 for float64 inputs), one tensor at a time, so the method streams tensor by tensor.

Choices where MERGING.md is silent (the reference code decides unless said otherwise):
- Tensors that are not 2-D (biases, norms, scalars, convolution kernels) take the mean
  (1/T) Σ_t τ_t, as the reference code does.
- Every 2-D tensor is a matrix, embeddings included, as in the reference code, which exempts
  only one CLIP tensor by name (``text_projection``, never changed by its fine-tunes, so zero
  either way); a name filter would not carry over to other models.
- The spectrum is Δ's singular values that are not numerically zero (σ > σ_max · max(rows,
  cols) · eps, the default rank tolerance of ``torch.linalg.matrix_rank``); σ̄ is their mean and
  U, V are their singular vectors. The reference averages all min(rows, cols) values and spreads
  σ̄ over every direction: the same result when Δ has full rank (dense fine-tunes), but for a
  rank-deficient Δ (LoRA deltas) it shrinks σ̄ and adds directions that are whatever LAPACK
  returns for a zero singular value. Here a rank-1 Δ is left as it is; a zero Δ gives θ0.
- Per-task coefficients: the reference takes one shared λ. Here α_t scales τ_t before the sum
  (MERGING.md's rule for every method), then λ = 1. The method is homogeneous, so α_t = λ for
  every task gives the shared-λ result.
- λ is the coefficient (the search supplies the grid; `merge` defaults it to 1.0).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from workers.merge.backbone import Coefficient, StateDict, TaskVectors
from workers.merge.registry import register
from workers.merge.tsv import merge_matrices, significant_triplets


class IsoCParams(BaseModel):
    """iso_c takes no params beyond the coefficient."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def task_sum(taus: list[Tensor]) -> Tensor:
    """Δ = Σ_t τ_t, summed in the given (sorted task) order."""
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total = total + tau
    return total


def iso_c_matrix(taus: list[Tensor]) -> Tensor:
    """σ̄ U Vᵀ for Δ = Σ_t τ_t = U Σ Vᵀ (one 2-D tensor, τ_t in one dtype, sorted tasks)."""
    delta = task_sum(taus)
    u, s, vh = significant_triplets(delta, min(delta.shape))
    if s.numel() == 0:
        return torch.zeros_like(delta)
    return s.mean() * (u @ vh)


@register("iso_c", params_model=IsoCParams, scales_delta=True)
def iso_c(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: IsoCParams,
) -> StateDict:
    """θ0 + λ · σ̄ U Vᵀ of Σ_t τ_t on 2-D tensors, θ0 + λ · mean τ on the others."""
    return merge_matrices(base, task_vectors, coefficient, iso_c_matrix)

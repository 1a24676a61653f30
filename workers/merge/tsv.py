"""Task Singular Vectors merging (TSV-M): keep each task's top singular directions per layer and
decorrelate them across tasks.

Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging"; reference code github.com/AntoAndGar/task_singular_vectors.

For each 2-D tensor: τ_t = U_t Σ_t V_tᵀ; keep each task's top k singular triplets; concatenate
U = [U_1,k … U_T,k], Σ = diag(Σ_1,k … Σ_T,k), V = [V_1,k … V_T,k]; replace U and V by their polar
factors (U⊥ = P Qᵀ where U = P S Qᵀ: the nearest matrix with orthonormal columns); then
τ_merged = U⊥ Σ V⊥ᵀ and θ = θ0 + λ τ_merged. SVDs run in float32 (float64 for float64 inputs),
one tensor at a time, so the method streams tensor by tensor.

Choices where MERGING.md is silent (the reference code decides unless said otherwise):
- Tensors that are not 2-D (biases, norms, scalars, convolution kernels) take the mean
  (1/T) Σ_t τ_t, as the reference code does.
- Every 2-D tensor is a matrix, embeddings included, as in the reference code, which exempts
  only one CLIP tensor by name (``text_projection``, never changed by its fine-tunes, so zero
  either way); a name filter would not carry over to other models.
- k = floor(r · fraction) with r = min(rows, cols), computed exactly (r // T for the default
  fraction 1/T), and at least 1. The reference has no minimum: a layer with fewer dimensions
  than there are tasks would merge to zero there, silently dropping every task's update.
  A `fraction` above 1/T is allowed: U then has more columns than fit orthonormally when
  T·k > rows, and U⊥ is still its polar factor; one task with fraction 1 is task arithmetic.
- Kept triplets whose singular value is numerically zero (σ ≤ σ_max · max(rows, cols) · eps,
  the default rank tolerance of ``torch.linalg.matrix_rank``) are left out, where the reference
  keeps them: their singular vectors are whatever LAPACK returns and would tilt the other
  tasks' directions in the orthogonalisation. This only matters for rank-deficient τ_t (LoRA
  deltas, a tensor a task never changed); all-zero task vectors give θ0 exactly. Directions
  shared exactly by several tasks make U rank-deficient; its polar factor is then not unique
  (here as in the reference), which real fine-tunes do not meet.
- Per-task coefficients: the reference takes one shared λ. Here α_t scales τ_t before the SVD
  (MERGING.md's rule for every method), then λ = 1. The method is homogeneous, so α_t = λ for
  every task gives the shared-λ result.
- λ is the coefficient (the search supplies the grid; `merge` defaults it to 1.0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    compute_dtype,
    finish,
    prepare_vectors,
    split_coefficient,
    sum_tasks,
    task_names,
)
from workers.merge.registry import register

Triplets = tuple[Tensor, Tensor, Tensor]


class TsvParams(BaseModel):
    """Params of `tsv` (MERGING.md): each task keeps floor(r · fraction) triplets (None: 1/T)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    fraction: float | None = Field(None, gt=0, le=1)


def kept_count(rank: int, tasks: int, fraction: float | None = None) -> int:
    """k = floor(rank · fraction) (exact decimal; rank // tasks by default), 1 <= k <= rank."""
    count = rank // tasks if fraction is None else math.floor(Decimal(str(fraction)) * rank)
    return max(1, min(rank, count))


def significant_triplets(matrix: Tensor, count: int, norm: Tensor | None = None) -> Triplets:
    """The top `count` singular triplets (U, σ, Vᵀ) of a matrix, numerically zero ones left out.

    σ is numerically zero when σ <= norm · max(rows, cols) · eps, `norm` defaulting to the
    matrix's own largest singular value; a zero matrix has no triplets.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    scale = s[0] if norm is None else norm
    tolerance = scale * max(matrix.shape) * torch.finfo(matrix.dtype).eps
    keep = min(count, int((s > tolerance).sum()))
    return u[:, :keep], s[:keep], vh[:keep]


def polar_factor(matrix: Tensor) -> Tensor:
    """P Qᵀ for matrix = P S Qᵀ: orthonormal columns (rows, when the matrix is wide)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def orthogonalise(triplets: list[Triplets]) -> Triplets:
    """Concatenated (U, σ, Vᵀ) of several triplet sets (not all empty), U and V replaced by
    their polar factors."""
    u = polar_factor(torch.cat([u for u, _, _ in triplets], dim=1))
    vh = polar_factor(torch.cat([vh for _, _, vh in triplets], dim=0))
    return u, torch.cat([s for _, s, _ in triplets]), vh


def is_empty(triplets: list[Triplets]) -> bool:
    """True when no set holds a triplet (every matrix was numerically zero)."""
    return all(s.numel() == 0 for _, s, _ in triplets)


def tsv_matrix(taus: list[Tensor], fraction: float | None = None) -> Tensor:
    """τ_merged = U⊥ Σ V⊥ᵀ for one 2-D tensor from the tasks' τ_t (same dtype, sorted tasks)."""
    count = kept_count(min(taus[0].shape), len(taus), fraction)
    triplets = [significant_triplets(tau, count) for tau in taus]
    if is_empty(triplets):
        return torch.zeros_like(taus[0])
    u, s, vh = orthogonalise(triplets)
    return (u * s) @ vh


def merge_matrices(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    merge_matrix: Callable[[list[Tensor]], Tensor],
) -> StateDict:
    """θ0 + λ τ_merged with `merge_matrix` on each non-empty 2-D tensor, the mean τ elsewhere.

    `merge_matrix` gets the tensor's α_t-scaled τ_t in one compute dtype, in sorted task order.
    """
    tasks = task_names(task_vectors)
    scales, lam = split_coefficient(coefficient, tasks)
    prepared = prepare_vectors(task_vectors, scales)
    merged: StateDict = {}
    for name in base:
        if base[name].dim() != 2 or base[name].numel() == 0:
            merged[name] = finish(base[name], sum_tasks(prepared, name) / len(tasks), lam)
            continue
        taus = [prepared[task][name] for task in tasks]
        dtype = compute_dtype(*taus)
        merged[name] = finish(base[name], merge_matrix([tau.to(dtype) for tau in taus]), lam)
    return merged


@register("tsv", params_model=TsvParams, scales_delta=True)
def tsv(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: TsvParams,
) -> StateDict:
    """θ0 + λ · TSV-M(τ_1..τ_T) on 2-D tensors, θ0 + λ · mean τ on the others."""
    return merge_matrices(
        base, task_vectors, coefficient, lambda taus: tsv_matrix(taus, params.fraction)
    )

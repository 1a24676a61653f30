"""Iso-CTS: isotropic merging in the common and task-specific subspaces.

Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces"; reference code github.com/danielm1405/iso-merging (``iso_cts``).

For each 2-D tensor, r = min(rows, cols): Δ = Σ_t τ_t = U Σ Vᵀ; its top c singular triplets span
the common subspace. Each task adds the top s triplets of its τ_t projected off that subspace,
τ_t − U_c U_cᵀ τ_t, with c + T·s = r. The triplets are concatenated (task blocks, then the common
one), U and V replaced by their polar factors as in `tsv`, and the spectrum made isotropic:
τ_merged = σ̄ U⊥ V⊥ᵀ with σ̄ the mean of the concatenated singular values; θ = θ0 + λ τ_merged.
SVDs run in float32 (float64 for float64 inputs), one tensor at a time, so the method streams.

Choices where MERGING.md is silent (the reference code decides unless said otherwise):
- `common` defaults to 0.8, the reference's ``common_space_fraction``.
- Sizes (`subspace_sizes`): c0 = floor(r · common) (exact decimal); each task's share is
  s = (r − c0) / T rounded half to even, as the reference's Python ``round``; the remainder
  c = r − T·s is the common size, so every task gets the same share. s is capped at r // T
  (the reference would make c negative when T > r). common 1 gives Iso-C; one task gives Iso-C.
- Tensors that are not 2-D (biases, norms, scalars, convolution kernels) take the mean
  (1/T) Σ_t τ_t, and every 2-D tensor is a matrix, embeddings included, as in the reference
  (it exempts only CLIP's ``text_projection`` by name, never changed by its fine-tunes).
- Triplets whose singular value is numerically zero are left out, from σ̄ and from the
  directions (as in `iso_c`; the tolerance is eps · max(rows, cols) times ‖Δ‖₂ for the common
  part and ‖τ_t‖₂ for task t's part, so a τ_t lying inside the common subspace adds nothing
  rather than rounding noise). With full-rank inputs this is the reference's result.
- Per-task coefficients: the reference takes one shared λ. Here α_t scales τ_t before every
  step (MERGING.md's rule for every method), then λ = 1; the method is homogeneous, so α_t = λ
  for every task gives the shared-λ result.
- λ is the coefficient (the search supplies the grid; `merge` defaults it to 1.0).
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from workers.merge.backbone import Coefficient, StateDict, TaskVectors
from workers.merge.iso_c import task_sum
from workers.merge.registry import register
from workers.merge.tsv import is_empty, merge_matrices, orthogonalise, significant_triplets


class IsoCtsParams(BaseModel):
    """Params of `iso_cts` (MERGING.md): the fraction of Δ's directions kept as common."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    common: float = Field(0.8, ge=0, le=1)


def subspace_sizes(rank: int, tasks: int, common: float) -> tuple[int, int]:
    """(c, s): the common subspace size and each task's share, c + tasks · s = rank."""
    first_common = math.floor(Decimal(str(common)) * rank)
    share = min(round(Fraction(rank - first_common, tasks)), rank // tasks)
    return rank - tasks * share, share


def iso_cts_matrix(taus: list[Tensor], common: float) -> Tensor:
    """σ̄ U⊥ V⊥ᵀ over the common and task-specific triplets of one 2-D tensor (sorted tasks)."""
    delta = task_sum(taus)
    common_size, share = subspace_sizes(min(delta.shape), len(taus), common)
    u_common, s_common, vh_common = significant_triplets(delta, common_size)
    triplets = []
    if share > 0:
        for tau in taus:
            specific = tau - u_common @ (u_common.T @ tau)
            norm = torch.linalg.matrix_norm(tau, ord=2)
            triplets.append(significant_triplets(specific, share, norm))
    triplets.append((u_common, s_common, vh_common))
    if is_empty(triplets):
        return torch.zeros_like(delta)
    u, s, vh = orthogonalise(triplets)
    return s.mean() * (u @ vh)


@register("iso_cts", params_model=IsoCtsParams, scales_delta=True)
def iso_cts(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: IsoCtsParams,
) -> StateDict:
    """θ0 + λ · Iso-CTS(τ_1..τ_T) on 2-D tensors, θ0 + λ · mean τ on the others."""
    return merge_matrices(
        base, task_vectors, coefficient, lambda taus: iso_cts_matrix(taus, params.common)
    )

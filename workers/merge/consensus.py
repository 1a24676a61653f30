"""Consensus merging: keep only the weights that at least k tasks' TALL masks use.

Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression"
(ICML).

m = 1[Σ_t m_t ≥ k] with the TALL masks m_t (λ_t = `lam`, one float or one per task), then
θ = θ0 + λ · (m ∘ τ_MTL). It removes "catastrophic" (no task) and "selfish" (one task) weights.
k = 0 is task arithmetic (ties with `use_ties`); k > T gives θ0. Per-task coefficients scale each
τ_t by α_t before the masks and τ_MTL, then λ = 1. With `use_ties`, streaming needs `thresholds`
from `ties.global_trim_thresholds` and `majority` from `ties.global_majority_sign` over the
(α-scaled) task vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from storage.errors import MergeInputError
from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    finish,
    prepare_vectors,
    split_coefficient,
    task_names,
)
from workers.merge.registry import register
from workers.merge.tall_masks import multi_task_vector, tall_mask
from workers.merge.ties import TiesParams

_TIES = TiesParams()
Lam = Annotated[float, Field(ge=0)]


class ConsensusParams(BaseModel):
    """Params of `consensus` (MERGING.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    k: int = Field(2, ge=0)
    lam: Lam | dict[str, Lam] = 0.4
    use_ties: bool = False


def _task_lams(params: ConsensusParams, tasks: list[str]) -> dict[str, float]:
    if not isinstance(params.lam, dict):
        return dict.fromkeys(tasks, params.lam)
    if sorted(params.lam) != tasks:
        raise MergeInputError(
            f"consensus param 'lam' names tasks {sorted(params.lam)} but the task vectors are "
            f"{tasks}: give one λ_t per task, or one float for all"
        )
    return dict(params.lam)


def _global_density(params: ConsensusParams) -> float | None:
    return _TIES.density if params.use_ties else None


@register(
    "consensus",
    params_model=ConsensusParams,
    global_trim_density=_global_density,
    internal_params=("thresholds", "majority"),
    scales_delta=True,
)
def consensus(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: ConsensusParams,
    thresholds: Mapping[str, float] | None = None,
    majority: float | None = None,
) -> StateDict:
    """θ0 + λ · (1[Σ_t m_t ≥ k] ∘ τ_MTL)."""
    tasks = task_names(task_vectors)
    lams = _task_lams(params, tasks)
    scales, lam = split_coefficient(coefficient, tasks)
    prepared = prepare_vectors(task_vectors, scales)
    merged = multi_task_vector(
        prepared, base, use_ties=params.use_ties, thresholds=thresholds, majority=majority
    )
    result: StateDict = {}
    for name in base:
        votes = torch.zeros(merged[name].shape, dtype=torch.int64, device=merged[name].device)
        for task in tasks:
            votes += tall_mask(prepared[task][name], merged[name], lams[task])
        kept = torch.where(votes >= params.k, merged[name], 0.0)
        result[name] = finish(base[name], kept, lam)
    return result

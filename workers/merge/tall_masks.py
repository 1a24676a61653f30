"""TALL masks: retrieve one task's model from a merged vector with a per-task mask.

Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression"
(ICML).

τ_MTL = Σ_t τ_t (or, with `use_ties`, TIES with merge: sum and the ties defaults density 0.2,
scope global). The mask of task t is m_t = 1[|τ_t| ≥ λ_t · |τ_MTL − τ_t|] (≥ as the paper
writes; the reference code's strict > drops the equality). The model for `task` is
θ0 + m_task ∘ τ_MTL; the coefficient is ignored, as in the paper. Storing τ_MTL once plus bit-
packed masks (`pack_mask`) replaces T task vectors. With `use_ties`, streaming needs
`thresholds` from `ties.global_trim_thresholds` and `majority` from `ties.global_majority_sign`
over the raw task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from storage.errors import MergeInputError
from storage.names import Name
from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    finish,
    prepare_vectors,
    sum_tasks,
)
from workers.merge.registry import register
from workers.merge.ties import TiesParams, ties_vectors

_TIES = TiesParams()
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class TallMasksParams(BaseModel):
    """Params of `tall_masks` (MERGING.md): the task to retrieve and its λ_t."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    task: Name
    lam: float = Field(0.4, ge=0)
    use_ties: bool = False


def multi_task_vector(
    prepared: Mapping[str, Mapping[str, Tensor]],
    names: Iterable[str],
    *,
    use_ties: bool = False,
    thresholds: Mapping[str, float] | None = None,
    majority: float | None = None,
) -> dict[str, Tensor]:
    """τ_MTL: the sum of the task vectors, or their TIES merge with merge: sum."""
    if use_ties:
        return ties_vectors(
            prepared,
            names,
            density=_TIES.density,
            scope=_TIES.scope,
            merge="sum",
            thresholds=thresholds,
            majority=majority,
        )
    return {name: sum_tasks(prepared, name) for name in names}


def tall_mask(task_vector: Tensor, multi_task: Tensor, lam: float) -> Tensor:
    """m_t = |τ_t| ≥ λ_t · |τ_MTL − τ_t|, element-wise, as a bool tensor."""
    return task_vector.abs() >= lam * (multi_task - task_vector).abs()


def pack_mask(mask: Tensor) -> Tensor:
    """Bit-pack a bool mask, 8 entries per uint8, first entry in the high bit (numpy.packbits)."""
    bits = mask.detach().flatten().to(torch.uint8).cpu()
    padded = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).reshape(-1, 8)
    return (padded * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: Iterable[int]) -> Tensor:
    """The bool mask of `shape` that `pack_mask` packed."""
    shape = tuple(shape)
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != -(-count // 8):
        raise MergeInputError(
            f"a packed mask for shape {shape} needs {-(-count // 8)} uint8 bytes, got "
            f"{packed.numel()} {packed.dtype}: unpack with the shape it was packed from"
        )
    bits = (packed.flatten().unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.flatten()[:count].reshape(shape)


def _global_density(params: TallMasksParams) -> float | None:
    return _TIES.density if params.use_ties else None


@register(
    "tall_masks",
    params_model=TallMasksParams,
    per_task_coefficients=False,
    uses_coefficient=False,
    retrieval=True,
    global_trim_density=_global_density,
    internal_params=("thresholds", "majority"),
)
def tall_masks(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: TallMasksParams,
    thresholds: Mapping[str, float] | None = None,
    majority: float | None = None,
) -> StateDict:
    """θ0 + m_task ∘ τ_MTL, the model retrieved for `params.task`."""
    if params.task not in task_vectors:
        raise MergeInputError(
            f"tall_masks param 'task' is {params.task!r}, which has no task vector: choose one "
            f"of {', '.join(sorted(task_vectors))}"
        )
    prepared = prepare_vectors(task_vectors, None)
    merged = multi_task_vector(
        prepared, base, use_ties=params.use_ties, thresholds=thresholds, majority=majority
    )
    retrieved: StateDict = {}
    for name in base:
        mask = tall_mask(prepared[params.task][name], merged[name], params.lam)
        retrieved[name] = finish(base[name], torch.where(mask, merged[name], 0.0))
    return retrieved

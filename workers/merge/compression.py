"""TALL-mask compression: τ_MTL once plus one bit-packed mask per task replaces T task vectors.

Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression"
(ICML). The model of task t is θ0 + m_t ∘ τ_MTL with m_t = 1[|τ_t| ≥ λ_t · |τ_MTL − τ_t|]
(see `tall_masks`); keeping τ_MTL (one vector) and the masks (1 bit per entry per task) costs
about (1 + T/32) / T of storing every float32 task vector. Retrieval is bit-for-bit
`merge("tall_masks", base, task_vectors, task=t, lam=λ_t)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge.backbone import StateDict, TaskVectors, finish, prepare_vectors, task_names
from workers.merge.tall_masks import multi_task_vector, pack_mask, tall_mask, unpack_mask
from workers.merge.ties import TiesParams, global_majority_sign, task_trim_threshold
from workers.merge.validation import validate_number, validate_task_vectors

_TIES = TiesParams()


@dataclass(frozen=True)
class TallCompressed:
    """τ_MTL (compute dtype), packed masks ``{task: {name: uint8}}`` and each task's λ_t."""

    multi_task: dict[str, Tensor]
    masks: dict[str, dict[str, Tensor]]
    lams: dict[str, float]
    use_ties: bool = False


def task_lams(lam: float | Mapping[str, float], tasks: list[str]) -> dict[str, float]:
    """One λ_t per task from a shared float or a per-task mapping naming exactly the tasks."""
    if not isinstance(lam, Mapping):
        validate_number(lam, "tall_masks λ")
        return dict.fromkeys(tasks, float(lam))
    if sorted(lam) != tasks:
        raise MergeInputError(
            f"tall_masks λ names tasks {sorted(lam)} but the task vectors are {tasks}: "
            "give one λ_t per task"
        )
    for task, value in lam.items():
        validate_number(value, f"tall_masks λ of task '{task}'")
    return {task: float(lam[task]) for task in tasks}


def compress_tensor(
    name: str,
    task_tensors: Mapping[str, Tensor],
    lams: Mapping[str, float],
    *,
    use_ties: bool = False,
    thresholds: Mapping[str, float] | None = None,
    majority: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """τ_MTL and each task's packed mask for one tensor.

    A global ties trim needs the whole backbone's `thresholds` and election `majority`.
    """
    prepared = prepare_vectors({task: {name: t} for task, t in task_tensors.items()}, None)
    merged = multi_task_vector(
        prepared, [name], use_ties=use_ties, thresholds=thresholds, majority=majority
    )[name]
    masks = {
        task: pack_mask(tall_mask(prepared[task][name], merged, lams[task]))
        for task in task_names(prepared)
    }
    return merged, masks


def compress_tall(
    base: StateDict,
    task_vectors: TaskVectors,
    lam: float | Mapping[str, float] = 0.4,
    *,
    use_ties: bool = False,
) -> TallCompressed:
    """Compress the task vectors of θ0 into τ_MTL plus bit-packed per-task masks."""
    validate_task_vectors(base, task_vectors)
    tasks = task_names(task_vectors)
    lams = task_lams(lam, tasks)
    thresholds, majority = None, None
    if use_ties:  # the whole-backbone trim and election, computed once so each tensor can go alone
        prepared = prepare_vectors(task_vectors, None)
        thresholds = {t: task_trim_threshold(prepared[t].values(), _TIES.density) for t in tasks}
        majority = global_majority_sign(
            ({task: prepared[task][name] for task in tasks} for name in base), thresholds
        )
    multi_task: dict[str, Tensor] = {}
    masks: dict[str, dict[str, Tensor]] = {task: {} for task in tasks}
    for name in base:
        vectors = {task: task_vectors[task][name] for task in tasks}
        multi_task[name], packed = compress_tensor(
            name, vectors, lams, use_ties=use_ties, thresholds=thresholds, majority=majority
        )
        for task in tasks:
            masks[task][name] = packed[task]
    return TallCompressed(multi_task, masks, lams, use_ties)


def retrieve_tensor(base: Tensor, multi_task: Tensor, packed: Tensor) -> Tensor:
    """θ0 + m_t ∘ τ_MTL for one tensor, in θ0's dtype."""
    mask = unpack_mask(packed, base.shape)
    return finish(base, torch.where(mask, multi_task, 0.0))


def retrieve_task(
    base: StateDict, multi_task: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> StateDict:
    """The model of one task from θ0, τ_MTL and that task's packed masks."""
    missing = next((name for name in base if name not in multi_task or name not in masks), None)
    if missing is not None:
        raise MergeInputError(
            f"the compressed TALL masks have no tensor '{missing}' of the base: compress them "
            "from task vectors of this base"
        )
    return {name: retrieve_tensor(base[name], multi_task[name], masks[name]) for name in base}


def compression_ratio(compressed: TallCompressed, task_vectors: TaskVectors) -> dict[str, float]:
    """Bytes of τ_MTL plus packed masks against bytes of every task vector (tensor data only)."""
    stored = sum(t.numel() * t.element_size() for t in compressed.multi_task.values())
    stored += sum(t.numel() for packed in compressed.masks.values() for t in packed.values())
    original = sum(
        t.numel() * t.element_size() for vector in task_vectors.values() for t in vector.values()
    )
    return {
        "ratio": stored / original,
        "stored_bytes": stored,
        "task_vector_bytes": original,
        "tasks": len(task_vectors),
    }

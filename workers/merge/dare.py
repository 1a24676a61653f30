"""DARE: drop and rescale each task vector, then merge.

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as
a Free Lunch" (ICML).

Each entry of each τ_t is dropped with probability p (Bernoulli) and the kept ones are rescaled
by 1/(1 − p) (`rescale`, default true), so E[dare(τ)] = τ; p = 0 is the identity. The random
stream of a tensor depends only on (seed, task name, tensor name): task order, other tasks and
streaming tensor by tensor never change it. Then `then: task_arithmetic` (dare_linear:
θ0 + λ Σ dare(τ_t)) or `then: ties` (dare_ties: TIES on the dropped vectors, with the ties
`density` and `scope`, defaults 0.2 and global). Per-task coefficients scale each dropped τ_t by
α_t before merging, then λ = 1. A global ties trim streams with `thresholds` computed by
`ties.global_trim_thresholds` and `majority` by `ties.global_majority_sign`, both over
`drop_and_rescale`d tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    finish,
    prepare_vectors,
    split_coefficient,
    sum_tasks,
    task_names,
    to_compute,
)
from workers.merge.registry import register
from workers.merge.ties import Scope, TiesParams, ties_vectors

_TIES = TiesParams()


class DareParams(BaseModel):
    """Params of `dare` (MERGING.md); `density` and `scope` apply only with then: ties."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    p: float = Field(0.5, ge=0, lt=1)
    rescale: bool = True
    seed: int = 0
    then: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    density: float | None = Field(None, gt=0, le=1)
    scope: Scope | None = None

    @model_validator(mode="after")
    def _ties_options_need_ties(self) -> DareParams:
        if self.then != "ties" and (self.density is not None or self.scope is not None):
            raise ValueError("'density' and 'scope' apply only with then: ties; drop them")
        return self


def stream_seed(seed: int, task: str, name: str) -> int:
    """The generator seed for one tensor of one task: a digest of (seed, task, name)."""
    digest = hashlib.sha256(json.dumps([seed, task, name]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_and_rescale(
    tensor: Tensor, *, task: str, name: str, p: float, rescale: bool = True, seed: int = 0
) -> Tensor:
    """dare(τ) for one tensor, in compute dtype; the mask is drawn on CPU for reproducibility."""
    value = to_compute(tensor)
    if p == 0:
        return value
    generator = torch.Generator().manual_seed(stream_seed(seed, task, name))
    keep = torch.rand(tuple(value.shape), generator=generator) >= p
    dropped = torch.where(keep.to(value.device), value, torch.zeros_like(value))
    return dropped / (1 - p) if rescale else dropped


def _ties_density(params: DareParams) -> float:
    return _TIES.density if params.density is None else params.density


def _ties_scope(params: DareParams) -> Scope:
    return _TIES.scope if params.scope is None else params.scope


def _global_density(params: DareParams) -> float | None:
    if params.then == "ties" and _ties_scope(params) == "global":
        return _ties_density(params)
    return None


def _dropped(tensor: Tensor, task: str, name: str, params: DareParams) -> Tensor:
    """What a global ties trim after dare sees: the dropped and rescaled task tensor."""
    return drop_and_rescale(
        tensor, task=task, name=name, p=params.p, rescale=params.rescale, seed=params.seed
    )


@register(
    "dare",
    params_model=DareParams,
    global_trim_density=_global_density,
    internal_params=("thresholds", "majority"),
    trim_input=_dropped,
    scales_delta=True,
)
def dare(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: DareParams,
    thresholds: Mapping[str, float] | None = None,
    majority: float | None = None,
) -> StateDict:
    """θ0 + λ · merge(dare(τ_1)..dare(τ_T)) with task arithmetic or ties."""
    scales, lam = split_coefficient(coefficient, task_names(task_vectors))

    def drop(task: str, name: str, value: Tensor) -> Tensor:
        return drop_and_rescale(
            value, task=task, name=name, p=params.p, rescale=params.rescale, seed=params.seed
        )

    prepared = prepare_vectors(task_vectors, scales, drop)
    if params.then == "ties":
        merged = ties_vectors(
            prepared,
            base,
            density=_ties_density(params),
            scope=_ties_scope(params),
            merge=_TIES.merge,
            thresholds=thresholds,
            majority=majority,
        )
    else:
        merged = {name: sum_tasks(prepared, name) for name in base}
    return {name: finish(base[name], merged[name], lam) for name in base}

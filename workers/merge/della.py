"""DELLA: drop each task-vector entry with a probability that falls with its magnitude, rescale
the kept ones, then elect signs and merge disjointly as TIES does.

Deep, Bhardwaj, Majumder and Poria 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling" (arXiv:2406.11617); its pruning step is MAGPRUNE.

1. MAGPRUNE, per τ_t tensor: rank the entries by |value|; with p = 1 − `density`, the drop
   probability p_i runs linearly in the rank from p + ε/2 (smallest magnitude) to p − ε/2
   (largest), ε = `epsilon`; drop with probability p_i and rescale kept entries by 1/(1 − p_i),
   so E[magprune(τ)] = τ and the mean p_i is p.
2. TIES election (γ = sign Σ_t, zero sums by the tensor's majority sign) and disjoint mean of
   the entries agreeing with γ (`ties.elect_and_merge`); there is no TIES trim: MAGPRUNE
   replaces it. DELLA is per tensor throughout (MERGING.md: "per τ_t tensor"), so its election
   is the per-tensor one of ties `scope: per_tensor` and it streams without a pre-pass.
3. θ = θ0 + λ τ_merged. Per-task coefficients scale each pruned τ_t by α_t before step 2, then
   λ = 1, as dare does.

Choices where MERGING.md is silent (reference: mergekit's della, sparsify.della_magprune):
- Ranks are taken over the whole flattened tensor (MERGING.md: "per τ_t tensor"); mergekit ranks
  each row of a 2-D tensor separately. Normalised rank r/(n − 1) sets p_i, so the ends are
  exactly p ± ε/2; a one-entry tensor takes p.
- Equal magnitudes share the mean of the ranks they span, hence the same p_i (mergekit's argsort
  orders them arbitrarily); exact zeros take part, as the smallest magnitudes.
- ε is the full spread, as the paper's p_min = p − ε/2; mergekit keeps with probability
  density ± ε, a spread of 2ε. Both need the probabilities inside [0, 1): here
  ε ≤ 2 (1 − density) and ε < 2 density.
- Kept entries are rescaled by 1/(1 − p_i), as MERGING.md and the paper; mergekit's della
  instead rescales to match the L1 norm by default.
- Defaults: `density` 0.5 (p = 0.5, dare's default drop rate; mergekit's default density 1
  drops nothing), `epsilon` 0.15 (mergekit's default value). With ε = 0 MAGPRUNE is dare's
  Bernoulli drop with the same p, though not the same random draws.
- The random stream of a tensor depends only on (seed, task name, tensor name), through
  `dare.stream_seed`, so task order, other tasks and streaming never change it; draws are made
  on the CPU. mergekit's weighted mean divides by the agreeing weights; here α_t scales before
  the election and the mean divides by the agreeing count, as ties and dare do.
"""

from __future__ import annotations

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
    stack_tasks,
    task_names,
    to_compute,
)
from workers.merge.dare import stream_seed
from workers.merge.registry import register
from workers.merge.ties import elect_and_merge


class DellaParams(BaseModel):
    """Params of `della` (MERGING.md): mean keep rate, spread of the drop rates, seed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    density: float = Field(0.5, gt=0, le=1)
    epsilon: float = Field(0.15, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        p = 1 - self.density
        if p - self.epsilon / 2 < 0 or p + self.epsilon / 2 >= 1:
            raise ValueError(
                f"drop probabilities 1 − density ± epsilon/2 span [{p - self.epsilon / 2:g}, "
                f"{p + self.epsilon / 2:g}], outside [0, 1): use epsilon at most "
                "2·(1 − density) and below 2·density"
            )
        return self


def drop_probabilities(tensor: Tensor, density: float, epsilon: float) -> Tensor:
    """MAGPRUNE's p_i per entry: from p + ε/2 at the smallest |value| to p − ε/2 at the largest."""
    magnitudes = to_compute(tensor).abs().flatten()
    count = magnitudes.numel()
    if count < 2:
        position = torch.full_like(magnitudes, 0.5)
    else:
        _, inverse, counts = torch.unique(
            magnitudes, sorted=True, return_inverse=True, return_counts=True
        )
        first_rank = torch.cumsum(counts, 0) - counts
        mean_rank = first_rank.to(magnitudes.dtype) + (counts.to(magnitudes.dtype) - 1) / 2
        position = mean_rank[inverse] / (count - 1)
    p = 1 - density
    return ((p + epsilon / 2) - epsilon * position).reshape(tensor.shape)


def magprune(
    tensor: Tensor, *, task: str, name: str, density: float, epsilon: float, seed: int = 0
) -> Tensor:
    """MAGPRUNE of one tensor in compute dtype: drop with p_i, rescale kept by 1/(1 − p_i)."""
    value = to_compute(tensor)
    if density == 1 and epsilon == 0:
        return value
    probabilities = drop_probabilities(value, density, epsilon)
    generator = torch.Generator().manual_seed(stream_seed(seed, task, name))
    draws = torch.rand(tuple(value.shape), generator=generator, dtype=value.dtype)
    keep = draws.to(value.device) >= probabilities
    return torch.where(keep, value / (1 - probabilities), torch.zeros_like(value))


@register("della", params_model=DellaParams, scales_delta=True)
def della(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: DellaParams,
) -> StateDict:
    """θ0 + λ · elect-and-merge(magprune(τ_1)..magprune(τ_T)), tensor by tensor."""
    scales, lam = split_coefficient(coefficient, task_names(task_vectors))

    def prune(task: str, name: str, value: Tensor) -> Tensor:
        return magprune(
            value,
            task=task,
            name=name,
            density=params.density,
            epsilon=params.epsilon,
            seed=params.seed,
        )

    prepared = prepare_vectors(task_vectors, scales, prune)
    return {
        name: finish(base[name], elect_and_merge(stack_tasks(prepared, name)), lam) for name in base
    }

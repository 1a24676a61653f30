"""Model Stock: interpolate from θ0 towards the mean fine-tune by the angle between them.

Jang, Yun and Han, ECCV 2024, "Model Stock: All we need is just a few fine-tuned models".

Per tensor, with k task vectors flattened to vectors: cos φ = the mean over the k(k − 1)/2 pairs
s < t of cos(τ_s, τ_t); t = k cos φ / (1 + (k − 1) cos φ); θ = θ0 + t · (1/k) Σ τ_t. There is no
coefficient: t is computed (registered uses_coefficient=False, so the search plans one point).

Choices where MERGING.md is silent (reference: mergekit's model_stock, default filter_wise off):
- Every tensor, 1-D (biases, norms) and 0-D included, is one flattened vector, as mergekit does
  without `filter_wise`; the row-wise `filter_wise` option is not offered.
- A pair in which either τ is exactly zero has cosine 0 (mergekit divides by a norm product
  clamped to 1e-6, which also gives 0 for a zero vector); the true cosine is used otherwise.
- A negative mean cosine counts as 0, so t = 0 and the tensor stays θ0 exactly. The paper
  derives t as an interpolation ratio between θ0 and the average, in [0, 1] for angles up to
  90°; below 0 the formula leaves that segment and has a pole at cos φ = −1/(k − 1), where
  mergekit returns ±inf/NaN. t is continuous at the clamp (t = 0 at cos φ = 0). Hence zero
  task vectors give θ0 exactly and no input gives NaN.
- One task vector is refused (registered min_tasks=2): the angle needs a pair; mergekit refuses
  fewer than two fine-tuned models too.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    finish,
    prepare_vectors,
    stack_tasks,
)
from workers.merge.registry import register


class ModelStockParams(BaseModel):
    """model_stock takes no params: its interpolation ratio is computed per tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def mean_pairwise_cosine(stacked: Tensor) -> float:
    """The mean cosine over pairs of rows of a (k, ...) stack; a pair with a zero row gives 0."""
    flat = stacked.reshape(len(stacked), -1)
    norms = [float(torch.linalg.vector_norm(row)) for row in flat]
    total, pairs = 0.0, 0
    for s in range(len(flat)):
        for t in range(s + 1, len(flat)):
            pairs += 1
            if norms[s] > 0 and norms[t] > 0:
                cosine = float(torch.dot(flat[s], flat[t])) / (norms[s] * norms[t])
                total += min(1.0, max(-1.0, cosine))
    return total / pairs


def interpolation_ratio(cosine: float, k: int) -> float:
    """t = k cos φ / (1 + (k − 1) cos φ), with a negative cos φ counted as 0 (t = 0)."""
    cosine = max(0.0, cosine)
    return k * cosine / (1 + (k - 1) * cosine)


@register(
    "model_stock",
    params_model=ModelStockParams,
    per_task_coefficients=False,
    uses_coefficient=False,
    min_tasks=2,
)
def model_stock(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: ModelStockParams,
) -> StateDict:
    """θ0 + t · mean_t τ_t per tensor, t from the mean pairwise angle; `coefficient` is ignored."""
    prepared = prepare_vectors(task_vectors, None)
    merged: StateDict = {}
    for name in base:
        stacked = stack_tasks(prepared, name)
        k = len(stacked)
        ratio = interpolation_ratio(mean_pairwise_cosine(stacked), k)
        merged[name] = finish(base[name], stacked.sum(dim=0) / k, ratio)
    return merged

"""Weight averaging: the plain mean of the fine-tuned models.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time" (ICML), the uniform soup.

θ = θ0 + λ · (1/T) Σ_t τ_t; the default λ = 1 is exactly the mean of the fine-tuned models.
Per-task coefficients are refused: weighting tasks differently is task_arithmetic.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    finish,
    prepare_vectors,
    sum_tasks,
)
from workers.merge.registry import MEAN, register


class WeightAverageParams(BaseModel):
    """weight_average takes no params."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@register(
    "weight_average",
    params_model=WeightAverageParams,
    per_task_coefficients=False,
    linear=MEAN,
    scales_delta=True,
)
def weight_average(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: WeightAverageParams,
) -> StateDict:
    """θ0 + λ · mean_t τ_t."""
    prepared = prepare_vectors(task_vectors, None)
    count = len(prepared)
    lam = float(coefficient)  # type: ignore[arg-type]
    return {name: finish(base[name], sum_tasks(prepared, name) / count, lam) for name in base}

"""Task arithmetic: add (or subtract) scaled task vectors.

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (ICLR); the same arithmetic on
linearized fine-tunes is Ortiz-Jiménez et al. 2023, "Task Arithmetic in the Tangent Space".

θ = θ0 + λ Σ_t τ_t with a shared λ, or θ0 + Σ_t α_t τ_t with per-task coefficients.
Negation (forgetting a task) is θ0 − λ τ_t, see `negate`.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict
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
)
from workers.merge.registry import EACH, get_method, register
from workers.merge.validation import validate_number


class TaskArithmeticParams(BaseModel):
    """task_arithmetic takes no params beyond the coefficient."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@register("task_arithmetic", params_model=TaskArithmeticParams, linear=EACH, scales_delta=True)
def task_arithmetic(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: TaskArithmeticParams,
) -> StateDict:
    """θ0 + λ Σ τ_t (shared λ) or θ0 + Σ α_t τ_t (per task)."""
    scales, lam = split_coefficient(coefficient, task_names(task_vectors))
    prepared = prepare_vectors(task_vectors, scales)
    return {name: finish(base[name], sum_tasks(prepared, name), lam) for name in base}


def negate(
    base: StateDict, task_vector: Mapping[str, Tensor], coefficient: float = 1.0
) -> StateDict:
    """θ0 − λ τ: remove a task's behaviour (task negation); errors call the vector 'negated'."""
    validate_number(coefficient, "the negation coefficient")
    return get_method("task_arithmetic").merge(base, {"negated": task_vector}, -coefficient)

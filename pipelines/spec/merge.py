"""The merge section of a spec: candidate methods, coefficient grids, search, negation."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.spec.base import SpecModel
from storage.names import Name


class CoefficientGrid(SpecModel):
    """Either an explicit ``values`` list or ``start``/``stop``/``num`` (ends included)."""

    values: list[float] | None = Field(default=None, min_length=1)
    start: float = 0.0
    stop: float = 1.0
    num: int = Field(default=21, ge=1)

    @model_validator(mode="after")
    def _finite(self) -> CoefficientGrid:
        numbers = list(self.values or []) + [self.start, self.stop]
        if any(not math.isfinite(v) for v in numbers):
            raise ValueError("coefficient values must be finite numbers (no NaN or inf)")
        return self

    def points(self) -> list[float]:
        if self.values is not None:
            return [float(v) for v in self.values]
        if self.num == 1:
            return [float(self.start)]
        step = (self.stop - self.start) / (self.num - 1)
        return [round(self.start + i * step, 10) for i in range(self.num)]


class CandidateSpec(SpecModel):
    method: Name
    params: dict[str, Any] = Field(default_factory=dict)
    coefficient: CoefficientGrid = CoefficientGrid()

    def is_linear(self, *, per_task: bool = False) -> bool:
        """Whether the method's registration makes it linear in its coefficients with these
        params (`LinearForm`) and, with `per_task`, takes one coefficient per task. An unknown
        method is neither; `pipelines.spec.load.check_candidates` reports it."""
        from workers.merge import get_method, list_methods

        if self.method not in list_methods():
            return False
        method = get_method(self.method)
        if per_task and not method.per_task_coefficients:
            return False
        return method.linear_form(self.params) is not None


class SearchSpec(SpecModel):
    """How the coefficient space is searched (MERGING.md, "Coefficient search")."""

    per_task: bool | None = Field(
        default=None, description="Default: true in linear mode if all are task_arithmetic."
    )
    strategy: Literal["grid", "coordinate_ascent", "successive_halving", "bayesian"] | None = Field(
        default=None,
        description="Default: coordinate_ascent when per_task, else grid. successive_halving "
        "(shared coefficients, standard mode): score every candidate on a small stratified "
        "subset of validation rows, keep the best 1/eta on eta times more rows, until at most "
        "eta remain, scored on the full split. bayesian (per_task): Optuna's TPE sampler "
        "proposes per-task coefficients within the grid's bounds.",
    )
    budget: int | None = Field(
        default=None,
        gt=0,
        description="Most candidates to score (required by bayesian); for successive_halving, "
        "most validation rows to score, summed over tasks and candidates.",
    )
    eta: int = Field(
        default=3, ge=2, description="successive_halving: keep 1/eta per rung, eta× the rows."
    )
    seed: int = Field(
        default=0, description="Seeds successive_halving's row subsets and bayesian's sampler."
    )
    warm_start: Literal["none", "champion"] = Field(
        default="none",
        description="champion: the registered champion's method, params and coefficients are "
        "always scored (and survive every halving rung), so promotion compares like with like.",
    )
    surrogate: Literal["none", "posthoc_linear"] = Field(
        default="none", description="posthoc_linear: rank by the linearized model, then verify."
    )
    verify_top: int = Field(default=3, ge=1, description="Candidates the surrogate verifies.")


class NegateSpec(SpecModel):
    """Task negation θ0 − α τ_target: forget ``target`` while ``control`` keeps its accuracy."""

    target: Name
    control: Name
    control_retention: float = Field(
        default=0.95, gt=0.0, le=1.0, description="Control accuracy kept vs zero-shot."
    )


class ScorerResources(SpecModel):
    """What each scorer actor asks Ray for."""

    num_cpus: float = Field(
        default=1, gt=0, description="CPUs per scorer actor; it evaluates with that many threads."
    )
    num_gpus: float = Field(
        default=0, ge=0, description="GPUs per scorer actor; above 0 it evaluates on CUDA."
    )

    @property
    def device(self) -> str:
        """Where a scorer evaluates: ``cuda`` when it is given GPUs, else ``cpu``."""
        return "cuda" if self.num_gpus > 0 else "cpu"


class MergeSpec(SpecModel):
    objective: Literal["mean_normalized_accuracy", "mean_accuracy", "negate"] = (
        "mean_normalized_accuracy"
    )
    candidates: list[CandidateSpec] = Field(
        default_factory=lambda: [CandidateSpec(method="task_arithmetic")], min_length=1
    )
    num_actors: int = Field(default=2, ge=1, description="Ray actors that score candidates.")
    resources: ScorerResources = ScorerResources()
    fast_path: Literal["auto", "off"] = Field(
        default="auto", description="auto: exact scoring without forward passes where it applies."
    )
    search: SearchSpec = SearchSpec()
    negate: NegateSpec | None = None

    @model_validator(mode="after")
    def _search_fits_objective(self) -> MergeSpec:
        if (self.objective == "negate") != (self.negate is not None):
            raise ValueError(
                "merge.objective 'negate' and merge.negate {target, control} go together: "
                "set both or neither"
            )
        if self.objective == "negate":
            if not all(c.is_linear(per_task=True) for c in self.candidates):
                raise ValueError(
                    "merge.objective 'negate' searches θ0 − α τ_target: every candidate must "
                    "be task_arithmetic without params"
                )
            if self.search.per_task or self.search.surrogate != "none":
                raise ValueError(
                    "merge.objective 'negate' has one coefficient: drop merge.search.per_task "
                    "and merge.search.surrogate"
                )
        if self.search.surrogate == "posthoc_linear" and not all(
            c.is_linear() for c in self.candidates
        ):
            raise ValueError(
                "merge.search.surrogate 'posthoc_linear' ranks merges linear in the task "
                "vectors: use task_arithmetic or weight_average candidates without params"
            )
        return self

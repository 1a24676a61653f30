"""Which search a spec asks for, resolved once (defaults depend on the mode), and its checks.

Kept apart from `pipelines.search.tangent` so that validating a spec does not import Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.spec.pipeline import Spec
from storage.errors import SpecError
from storage.quoting import quoted


@dataclass(frozen=True)
class SearchSettings:
    per_task: bool
    strategy: str
    fast_path: bool  # the exact fast path is on (linear mode, merge.fast_path auto)
    surrogate: bool
    linear: bool
    negate: bool
    all_fast: bool  # every candidate is scored on the fast path: one scorer actor is enough

    @property
    def tangent(self) -> bool:
        """Whether this search needs the tangent-space scorer and this module at all."""
        return self.linear or self.per_task or self.surrogate or self.negate


def resolve_search(spec: Spec) -> SearchSettings:
    linear = spec.finetune.mode == "linear"
    # A causal LM's fast path scores token accuracy (cached last hidden states through the
    # frozen LM head); searching on another metric takes real linearized forward passes.
    exact = spec.evaluation.metric in (None, "accuracy", "token_accuracy")
    fast = linear and spec.merge.fast_path == "auto" and exact
    per_task = spec.merge.search.per_task
    if per_task is None:
        per_task = (
            fast
            and spec.merge.objective != "negate"
            and all(c.is_linear(per_task=True) for c in spec.merge.candidates)
        )
    strategy = spec.merge.search.strategy or ("coordinate_ascent" if per_task else "grid")
    negate = spec.merge.objective == "negate"
    surrogate = spec.merge.search.surrogate == "posthoc_linear"
    all_fast = fast and all(c.is_linear() for c in spec.merge.candidates)
    return SearchSettings(per_task, strategy, fast, surrogate, linear, negate, all_fast)


def check_search(spec: Spec, origin: str) -> None:
    """Cross-field rules of merge.search / merge.negate that need the tasks or the registry."""
    from workers.merge import get_method

    names = [task.name for task in spec.tasks]
    negate = spec.merge.negate
    if negate is not None:
        for role in ("target", "control"):
            if getattr(negate, role) not in names:
                raise SpecError(
                    f"{origin}: field 'merge.negate.{role}': {quoted(getattr(negate, role))} is "
                    f"not a task: use one of {names}"
                )
        if negate.target == negate.control:
            raise SpecError(f"{origin}: merge.negate: target and control must differ")
    if (
        getattr(spec.base_model, "kind", "classification") != "classification"
        and spec.merge.search.surrogate != "none"
    ):
        raise SpecError(
            f"{origin}: merge.search.surrogate scores through a classifier's head: a "
            "causal_lm's candidates are scored by forward passes (set it to 'none')"
        )
    if spec.finetune.mode == "linear" and spec.merge.search.surrogate != "none":
        raise SpecError(
            f"{origin}: merge.search.surrogate is for standard-mode task vectors; in linear "
            "mode the fast path is exact (merge.fast_path: auto)"
        )
    check_strategy(spec, origin)
    if spec.merge.resources.num_gpus > 0 and resolve_search(spec).tangent:
        raise SpecError(
            f"{origin}: merge.resources.num_gpus: the tangent-space search (linear mode, "
            "per-task coefficients, a surrogate or negation) evaluates on the CPU: set it to 0"
        )
    if resolve_search(spec).per_task:
        for index, candidate in enumerate(spec.merge.candidates):
            method = get_method(candidate.method)
            if not (method.per_task_coefficients and method.uses_coefficient):
                raise SpecError(
                    f"{origin}: field 'merge.candidates[{index}]': {candidate.method} takes no "
                    "per-task coefficients: drop it or set merge.search.per_task: false"
                )


def check_strategy(spec: Spec, origin: str) -> None:
    """Which strategies fit which searches (README, "Search strategies")."""
    settings = resolve_search(spec)
    search = spec.merge.search
    if search.strategy == "successive_halving" and settings.tangent:
        raise SpecError(
            f"{origin}: merge.search.strategy successive_halving ranks shared-coefficient "
            "candidates scored by forward passes in standard mode: drop merge.search.per_task, "
            "surrogate and negate (linear mode's fast path scores every row at no cost)"
        )
    if search.strategy == "bayesian" and not settings.per_task:
        raise SpecError(
            f"{origin}: merge.search.strategy bayesian proposes per-task coefficients: set "
            "merge.search.per_task: true, or use grid or successive_halving"
        )
    if search.strategy == "bayesian" and search.budget is None:
        raise SpecError(
            f"{origin}: merge.search.strategy bayesian needs merge.search.budget: the number "
            "of candidates to score"
        )
    if search.warm_start == "champion" and settings.negate:
        raise SpecError(
            f"{origin}: merge.search.warm_start champion seeds a merge search; task negation "
            "has no champion to compare with: drop warm_start"
        )

"""The merge-method registry: one method per file, registered under its file name.

A method file defines a pydantic params model and an implementation, and registers them with
`@register("<file name>", params_model=...)`. Registering a name twice, or under a name that is
not the file's, fails at import.

The registration also declares what the rest of the system needs to know about the method, so
no call site tests method names: `retrieval` (one model per task), `linear` (how θ − θ0 follows
from the coefficient, for the fast path, the fused kernel and LoRA factor-space merges) and
`statistics` (the data it needs). Call sites read them from `get_method(name)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError
from torch import Tensor

from storage.errors import MergeInputError
from storage.quoting import quoted
from workers.merge.backbone import Coefficient, StateDict, TaskVectors
from workers.merge.validation import (
    validate_coefficient,
    validate_task_count,
    validate_task_vectors,
)

Implementation = Callable[..., StateDict]
"""`(base, task_vectors, coefficient, params, **internal) -> θ`, inputs already validated."""

TrimInput = Callable[[Tensor, str, str, Any], Tensor]
"""`(tensor, task, tensor name, validated params) -> tensor`: what a global ties trim sees."""


@dataclass(frozen=True)
class LinearForm:
    """How a method linear in its coefficients builds θ − θ0 = Σ_s α_s τ_s.

    α_s is task s's coefficient (the shared λ, or its own α_s where the method takes per-task
    coefficients), divided by the number of tasks T when `mean`. Linear methods are scored
    exactly by the fast path (DESIGN.md), merged by the fused linear kernel and merged in
    factor space for LoRA adapters. Unless `with_params`, the form holds only without params.
    """

    mean: bool = False
    with_params: bool = False

    def weights(
        self, coefficient: float | Mapping[str, float], tasks: Sequence[str]
    ) -> list[float]:
        """The α_s of `tasks`, in order, from a validated coefficient."""
        if isinstance(coefficient, Mapping):
            alphas = [float(coefficient[task]) for task in tasks]
        else:
            alphas = [float(coefficient)] * len(tasks)
        return [alpha / len(tasks) for alpha in alphas] if self.mean else alphas


EACH = LinearForm()
"""θ = θ0 + Σ_s α_s τ_s with each coefficient as is (task_arithmetic)."""
MEAN = LinearForm(mean=True)
"""θ = θ0 + (λ / T) Σ_s τ_s (weight_average)."""


class MergeMethod(Protocol):
    """What the merge engine and the search need to know about one merge method."""

    name: str
    params_model: type[BaseModel]
    per_task_coefficients: bool  # accepts {task: α_t} as the coefficient
    uses_coefficient: bool  # False: the coefficient is ignored (tall_masks)
    per_tensor: bool  # with default params, each tensor merges alone (streamable, no pre-pass)
    statistics: str | None  # the per-task data statistics it reads ("gram", "fisher"), or None
    retrieval: bool  # one model per task (tall_masks): the search sets `task` and a λ_t each
    linear: LinearForm | None  # how θ − θ0 follows from the coefficient, None: not linear
    min_tasks: int  # model_stock needs two to measure an angle
    max_tasks: int | None  # slerp: exactly two

    def check_task_count(self, count: int) -> None: ...

    def linear_form(self, params: Mapping[str, Any]) -> LinearForm | None: ...

    def validate_params(self, params: Mapping[str, Any]) -> BaseModel: ...

    def global_trim_density(self, params: BaseModel) -> float | None: ...

    def merge(
        self,
        base: StateDict,
        task_vectors: TaskVectors,
        coefficient: Coefficient = 1.0,
        **params: Any,
    ) -> StateDict: ...


def _no_global_trim(params: BaseModel) -> float | None:
    return None


@dataclass(frozen=True)
class RegisteredMethod:
    """A registered merge method; `merge` validates every input before the math runs."""

    name: str
    params_model: type[BaseModel]
    implementation: Implementation
    per_task_coefficients: bool = True
    uses_coefficient: bool = True
    per_tensor: bool = True
    trim_density: Callable[[Any], float | None] = _no_global_trim
    internal_params: tuple[str, ...] = ()
    statistics: str | None = None
    retrieval: bool = False
    linear: LinearForm | None = None
    kernel: Literal["ties"] | None = None  # its fused float32 kernel (workers.merge.kernels)
    trim_input: TrimInput | None = None  # dare: its global ties trim sees the dropped vectors
    min_tasks: int = 1
    max_tasks: int | None = None  # slerp: exactly two
    scales_delta: bool = False  # a shared λ gives θ0 + λ·Δ, Δ from the task vectors alone

    def linear_form(self, params: Mapping[str, Any]) -> LinearForm | None:
        """How θ − θ0 follows from the coefficient with these params, or None: not linear."""
        if self.linear is None or (params and not self.linear.with_params):
            return None
        return self.linear

    def check_task_count(self, count: int) -> None:
        """Raise MergeInputError unless this method merges `count` task vectors."""
        validate_task_count(
            count, method=self.name, min_tasks=self.min_tasks, max_tasks=self.max_tasks
        )

    def validate_params(self, params: Mapping[str, Any]) -> BaseModel:
        """The user-facing params, validated; errors name the method and the param."""
        try:
            return self.params_model.model_validate(dict(params))
        except ValidationError as error:
            first = error.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "params"
            known = ", ".join(self.params_model.model_fields) or "none"
            got = "" if first["type"] == "missing" else f" (got {quoted(first['input'])})"
            raise MergeInputError(
                f"{self.name} param '{field}': {first['msg']}{got}; {self.name} params are: "
                f"{known}. Fix the value, or leave it out to use the default"
            ) from None

    def global_trim_density(self, params: BaseModel) -> float | None:
        """The density of a whole-backbone ties trim these params need, else None.

        When not None, streaming tensor by tensor needs `thresholds={task: float}` computed
        first with `ties.global_trim_thresholds` (see the method's docstring for what it sees),
        then `majority` (the whole backbone's election sign) with `ties.global_majority_sign`.
        """
        return self.trim_density(params)

    def merge(
        self,
        base: StateDict,
        task_vectors: TaskVectors,
        coefficient: Coefficient = 1.0,
        **params: Any,
    ) -> StateDict:
        """θ0 merged with the task vectors; inputs are untouched, the result is a new dict."""
        validate_task_vectors(base, task_vectors)
        self.check_task_count(len(task_vectors))
        if self.uses_coefficient:
            validate_coefficient(
                coefficient, task_vectors, method=self.name, per_task=self.per_task_coefficients
            )
        internal = {key: params.pop(key) for key in self.internal_params if key in params}
        validated = self.validate_params(params)
        for key in ("thresholds", "majority"):
            if key in internal and self.trim_density(validated) is None:
                raise MergeInputError(
                    f"{self.name} param '{key}' applies only to a global ties trim, which these "
                    "params do not use: drop it"
                )
        return self.implementation(base, task_vectors, coefficient, validated, **internal)


_REGISTRY: dict[str, RegisteredMethod] = {}


def register(
    name: str,
    *,
    params_model: type[BaseModel],
    per_task_coefficients: bool = True,
    uses_coefficient: bool = True,
    per_tensor: bool = True,
    global_trim_density: Callable[[Any], float | None] = _no_global_trim,
    internal_params: tuple[str, ...] = (),
    statistics: str | None = None,
    retrieval: bool = False,
    linear: LinearForm | None = None,
    kernel: Literal["ties"] | None = None,
    trim_input: TrimInput | None = None,
    min_tasks: int = 1,
    max_tasks: int | None = None,
    scales_delta: bool = False,
) -> Callable[[Implementation], Implementation]:
    """Register the decorated implementation as merge method `name` (its file name).

    ``statistics``: the per-task data statistics the method reads (``"gram"``: each linear
    layer's input Gram matrix; ``"fisher"``: the diagonal Fisher), passed to it as the internal
    param ``statistics={task: {tensor name: tensor}}``; the pipeline computes them before the
    search (``workers.finetune.statistics``).
    ``retrieval``: one model per task, not one merged model: its params have ``task`` (the
    search merges once per task) and ``lam`` (the planner searches a λ_t grid, each task keeps
    its best), and it publishes as TALL-compressed task vectors (``storage.tall``).
    ``linear``: θ − θ0 = Σ_s α_s τ_s, how α follows from the coefficient (:class:`LinearForm`).
    ``kernel``: the fused float32 kernel that gives this method's result bit for bit.
    ``trim_input``: what a global ties trim sees of each task tensor, when not the tensor.
    ``scales_delta``: with one shared coefficient λ the merge is ``finish(θ0, Δ, λ)`` =
    θ0 + λ·Δ, where Δ (the merge onto a zero θ0 at λ = 1) depends on the task vectors, params
    and statistics only; a search then computes Δ once for every λ of a grid
    (``tests/unit/test_method_properties.py`` checks it bit for bit).
    """

    def decorator(implementation: Implementation) -> Implementation:
        if name in _REGISTRY:
            owner = _REGISTRY[name].implementation.__module__
            raise ValueError(f"merge method '{name}' is already registered by {owner}")
        file_name = implementation.__module__.rsplit(".", 1)[-1]
        if file_name != name:
            raise ValueError(
                f"merge method '{name}' must be registered from a file named {name}.py, "
                f"not {file_name}.py"
            )
        fields = params_model.model_fields
        if retrieval and not {"task", "lam"} <= set(fields):
            raise ValueError(f"retrieval method '{name}' needs params 'task' and 'lam'")
        if linear is not None and not uses_coefficient:
            raise ValueError(f"merge method '{name}' ignores its coefficient: it is not linear")
        if scales_delta and (retrieval or not uses_coefficient):
            raise ValueError(
                f"merge method '{name}' does not scale one merged delta by its coefficient"
            )
        _REGISTRY[name] = RegisteredMethod(
            name=name,
            params_model=params_model,
            implementation=implementation,
            per_task_coefficients=per_task_coefficients,
            uses_coefficient=uses_coefficient,
            per_tensor=per_tensor,
            trim_density=global_trim_density,
            internal_params=internal_params,
            statistics=statistics,
            retrieval=retrieval,
            linear=linear,
            kernel=kernel,
            trim_input=trim_input,
            min_tasks=min_tasks,
            scales_delta=scales_delta,
            max_tasks=max_tasks,
        )
        return implementation

    return decorator


def list_methods() -> list[str]:
    """Names of the registered merge methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> RegisteredMethod:
    """The registered method `name`; an unknown name raises MergeInputError listing the known."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MergeInputError(
            f"unknown merge method {quoted(name)}: choose one of {', '.join(list_methods())}"
        ) from None

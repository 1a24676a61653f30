"""The pipeline spec: typed, validated once at the edge, loaded from YAML.

Every model is frozen and forbids unknown fields; the JSON schema is generated from these
models (``mergeline schema``), never written by hand.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.errors import SpecError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_safe_name(value: str, what: str) -> str:
    if not _SAFE_NAME.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not safe as a path component: use letters, digits, '.', '_' "
            "or '-' (1-64 characters, starting with a letter or digit)"
        )
    return value


# ----------------------------------------------------------------------------- data
class Transform(_Model):
    """A fixed, seeded input transformation that turns one dataset into a new domain."""

    kind: Literal["none", "permute", "rot90", "rot180", "transpose", "flip", "invert"] = "none"
    seed: int = 0


class SklearnDataset(_Model):
    """A dataset bundled with scikit-learn (no download)."""

    source: Literal["sklearn"] = "sklearn"
    name: Literal["digits", "iris", "wine", "breast_cancer"] = "digits"
    classes: list[int] | None = Field(default=None, min_length=2)
    pool: Literal["all", "pretrain", "tasks"] = Field(
        default="all",
        description="'pretrain' and 'tasks' are two fixed disjoint halves of the examples, so "
        "a base pretrained on 'pretrain' never sees a task's validation or test example.",
    )
    pretrain_fraction: float = Field(default=0.4, gt=0.0, lt=1.0)
    test_fraction: float = Field(default=0.3, gt=0.0, lt=1.0)
    transform: Transform = Transform()


DatasetSpec = Annotated[SklearnDataset, Field(discriminator="source")]


class TaskSpec(_Model):
    name: str
    dataset: DatasetSpec

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        return _check_safe_name(value, "task name")


# ----------------------------------------------------------------------------- model
class PretrainSpec(_Model):
    """Pretrain the builtin base on a dataset disjoint from the tasks; cached in the store."""

    dataset: DatasetSpec
    steps: int = Field(default=1500, gt=0)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=1.0e-3, gt=0.0)


class BuiltinModel(_Model):
    source: Literal["builtin"] = "builtin"
    name: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default=[512, 512], min_length=1)
    features: int = Field(default=8, gt=0)
    seed: int = 0
    pretrain: PretrainSpec | None = None


ModelSpec = Annotated[BuiltinModel, Field(discriminator="source")]


# ----------------------------------------------------------------------------- fine-tune
class DeepSpeedSpec(_Model):
    zero_stage: Literal[0, 1, 2, 3] = 0


class ResourcesSpec(_Model):
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, gt=0)
    num_workers: int = Field(default=1, ge=1)


class FinetuneSpec(_Model):
    mode: Literal["standard", "linear"] = "standard"
    steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=1.0e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    head: Literal["frozen"] = "frozen"
    seed: int = 0
    deepspeed: DeepSpeedSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def _linear_needs_jvp(self) -> FinetuneSpec:
        if self.mode == "linear" and self.deepspeed and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "finetune.mode 'linear' needs forward-mode AD, which ZeRO stage 3 does not "
                "support: use deepspeed.zero_stage 0, 1 or 2"
            )
        return self


# ----------------------------------------------------------------------------- merge
class CoefficientGrid(_Model):
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


class CandidateSpec(_Model):
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    coefficient: CoefficientGrid = CoefficientGrid()


class MergeSpec(_Model):
    objective: Literal["mean_normalized_accuracy", "mean_accuracy"] = "mean_normalized_accuracy"
    candidates: list[CandidateSpec] = Field(
        default_factory=lambda: [CandidateSpec(method="task_arithmetic")], min_length=1
    )
    num_actors: int = Field(default=2, ge=1, description="Ray actors that score candidates.")


# ----------------------------------------------------------------------------- the rest
class EvaluationSpec(_Model):
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    val_max: int = Field(default=5000, gt=0)
    split_seed: int = 0


class StorageSpec(_Model):
    uri: str = "file://.mergeline/store"
    endpoint_url: str | None = None

    @field_validator("uri")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not re.match(r"^(file|s3)://.+", value):
            raise ValueError(f"storage.uri {value!r} must start with file:// or s3://")
        return value


class TrackingSpec(_Model):
    uri: str = "sqlite:///.mergeline/mlflow.db"
    experiment: str = "mergeline"
    registered_model: str | None = None

    @field_validator("uri")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not re.match(r"^(sqlite:///|https?://).+", value):
            raise ValueError(
                f"tracking.uri {value!r} must start with sqlite:///, http:// or https://"
            )
        return value


class ComputeSpec(_Model):
    ray_address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0, description="CPUs of a local Ray.")


class Spec(_Model):
    name: str
    base_model: ModelSpec = BuiltinModel()
    tasks: list[TaskSpec] = Field(min_length=1)
    finetune: FinetuneSpec = FinetuneSpec()
    merge: MergeSpec = MergeSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    storage: StorageSpec = StorageSpec()
    tracking: TrackingSpec = TrackingSpec()
    compute: ComputeSpec = ComputeSpec()

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        return _check_safe_name(value, "spec name")

    @model_validator(mode="after")
    def _unique_tasks(self) -> Spec:
        seen: set[str] = set()
        for index, task in enumerate(self.tasks):
            if task.name in seen:
                raise ValueError(
                    f"tasks[{index}].name {task.name!r} is used twice: task names must be unique"
                )
            seen.add(task.name)
        return self

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or self.name


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()


__all__ = ["Spec", "SpecError", "json_schema"]

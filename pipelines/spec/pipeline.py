"""The whole pipeline spec, its cross-section rules and its generated JSON schema.

Every model is frozen and forbids unknown fields; the JSON schema is generated from these
models (``mergeline schema``), never written by hand.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from pipelines.spec.base import SpecModel
from pipelines.spec.base_model import BuiltinModel, HFModel, ModelSpec
from pipelines.spec.finetune import FinetuneSpec
from pipelines.spec.merge import MergeSpec
from pipelines.spec.services import ComputeSpec, PublishSpec, StorageSpec, TrackingSpec
from pipelines.spec.tasks import EvaluationSpec, TaskSpec
from storage.names import Name
from storage.quoting import quoted


class Spec(SpecModel):
    name: Name
    base_model: ModelSpec = BuiltinModel()
    tasks: list[TaskSpec] = Field(min_length=1)
    finetune: FinetuneSpec = FinetuneSpec()
    merge: MergeSpec = MergeSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    storage: StorageSpec = StorageSpec()
    tracking: TrackingSpec = TrackingSpec()
    publish: PublishSpec = PublishSpec()
    compute: ComputeSpec = ComputeSpec()

    @model_validator(mode="after")
    def _unique_tasks(self) -> Spec:
        seen: set[str] = set()
        for index, task in enumerate(self.tasks):
            if task.name in seen:
                raise ValueError(
                    f"tasks[{index}].name {quoted(task.name)} is used twice: task names must "
                    "be unique"
                )
            seen.add(task.name)
        return self

    @model_validator(mode="after")
    def _kind_fits(self) -> Spec:
        kind = getattr(self.base_model, "kind", "classification")
        metrics = {
            "classification": ("accuracy",),
            "causal_lm": ("token_accuracy", "exact_match", "nll", "choice_accuracy"),
        }[kind]
        metric = self.evaluation.metric
        if metric is not None and metric not in metrics:
            raise ValueError(
                f"evaluation.metric {quoted(metric)} does not score a {kind} task: use one of "
                f"{list(metrics)}"
            )
        if metric == "nll":
            raise ValueError(
                "evaluation.metric 'nll' is reported, not optimised (lower is better): search "
                "on token_accuracy or exact_match"
            )
        gguf = getattr(self.base_model, "gguf_file", None)
        if gguf is not None and kind != "causal_lm":
            raise ValueError(
                "base_model.gguf_file holds a causal LM: set base_model.kind: causal_lm"
            )
        for index, task in enumerate(self.tasks):
            dataset = task.dataset
            prompts = any(
                getattr(dataset, f, None) is not None for f in ("prompt_column", "messages_column")
            )
            if kind == "causal_lm" and not prompts:
                raise ValueError(
                    f"tasks[{index}].dataset: base_model.kind 'causal_lm' trains on prompt -> "
                    "completion: set prompt_column and completion_column, or messages_column "
                    "(text_column/label_column are for classification)"
                )
            if metric == "choice_accuracy" and getattr(dataset, "choices_column", None) is None:
                raise ValueError(
                    f"tasks[{index}].dataset: evaluation.metric 'choice_accuracy' needs "
                    "choices_column and answer_column"
                )
            if kind != "causal_lm" and prompts:
                column = (
                    "prompt_column"
                    if getattr(dataset, "prompt_column", None)
                    else ("messages_column")
                )
                raise ValueError(
                    f"tasks[{index}].dataset.{column} needs base_model.kind: causal_lm "
                    "(a classifier reads text_column and label_column)"
                )
        return self

    @model_validator(mode="after")
    def _inputs_fit_model(self) -> Spec:
        text = isinstance(self.base_model, HFModel)
        classifies = getattr(self.base_model, "kind", "classification") == "classification"
        for index, task in enumerate(self.tasks if classifies else ()):  # else: _kind_fits
            dataset = task.dataset
            reads_text = getattr(dataset, "text_column", None) is not None
            if text and not reads_text:
                raise ValueError(
                    f"tasks[{index}].dataset: base_model.source 'hf' reads text: use a files "
                    "or huggingface dataset with text_column"
                )
            if not text and reads_text:
                raise ValueError(
                    f"tasks[{index}].dataset.text_column needs a base model with a tokenizer "
                    "(base_model.source: hf); the builtin MLP reads numeric features"
                )
        if text and self.base_model.attn_implementation != "eager":
            needs_jvp = {
                "finetune.mode 'linear'": self.finetune.mode == "linear",
                "merge.search.surrogate 'posthoc_linear'": (
                    self.merge.search.surrogate == "posthoc_linear"
                ),
            }
            for what, needed in needs_jvp.items():
                if needed:
                    raise ValueError(
                        f"{what} needs forward-mode AD, which fused attention lacks: set "
                        "base_model.attn_implementation to 'eager'"
                    )
        return self

    @model_validator(mode="after")
    def _checkpointing_fits_model(self) -> Spec:
        if self.finetune.gradient_checkpointing and not isinstance(self.base_model, HFModel):
            raise ValueError(
                "finetune.gradient_checkpointing needs a Hugging Face model (base_model.source: "
                "hf); the builtin MLP has no activations worth recomputing: set it to false"
            )
        return self

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or self.name


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()


__all__ = ["Spec", "json_schema"]

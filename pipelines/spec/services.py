"""The services a run uses: artifact storage, MLflow tracking, publishing, Ray compute."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from pipelines.spec.base import SpecModel, check_endpoint_url, check_no_credentials
from storage.names import Name
from storage.quoting import quoted


class StorageSpec(SpecModel):
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
        return check_no_credentials(value, "storage.uri")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return check_endpoint_url(value, "storage.endpoint_url")


class TrackingSpec(SpecModel):
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


class PublishSpec(SpecModel):
    min_improvement: float = Field(
        default=0.0,
        ge=0.0,
        description="A new version becomes 'champion' only if its test objective beats the "
        "champion's, on the same tasks, by at least this much.",
    )


class ComputeSpec(SpecModel):
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

"""Typed references the stages hand each other: where an artifact is, its sha256, what made it.

They live beside the plan, on the ground floor of ``pipelines/``, because both ``stages/`` (in
Ray) and ``run/`` (the driver) take and return them; they are in-memory hand-offs, not a store
format (the manifests and ``storage.artifacts.ArtifactRef`` stay in ``storage/``). Each is a
frozen dataclass of plain data, so Ray pickles it into a task as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage.artifacts import ArtifactRef


@dataclass(frozen=True)
class DatasetRef:
    """A task's data: the spec's ``dataset`` section (its source) and the digest in its keys."""

    task: str
    source: dict[str, Any]
    digest: str | None = None

    @property
    def what(self) -> str:
        """The spec field named in a data error."""
        return f"tasks[{self.task}].dataset"


@dataclass(frozen=True)
class BaseModelRef:
    """The stored base model θ0: its cache key, where it is, and its manifest's meta (digest,
    config, input_dim)."""

    key: str
    uri: str
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.meta["digest"]

    @property
    def config(self) -> dict[str, Any]:
        """The spec's ``base_model`` section it was built from."""
        return self.meta["config"]

    @property
    def input_dim(self) -> int:
        return self.meta["input_dim"]

    @classmethod
    def from_artifact(cls, key: str, artifact: ArtifactRef) -> BaseModelRef:
        return cls(key, artifact.uri, artifact.sha256, dict(artifact.meta))


@dataclass(frozen=True)
class TaskVectorRef:
    """One task's stored task vector τ_t: the task, its cache key, where it is, its manifest's
    meta (reference accuracies, dataset digest, mode)."""

    task: str
    key: str
    uri: str
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str | None:
        return self.meta.get("mode")

    @property
    def dataset_digest(self) -> str:
        return self.meta["dataset_digest"]

    @classmethod
    def from_artifact(cls, task: str, key: str, artifact: ArtifactRef) -> TaskVectorRef:
        return cls(task, key, artifact.uri, artifact.sha256, artifact.meta)


@dataclass(frozen=True)
class MergedModelRef:
    """The published merged model: the registered name and run that wrote it, where it is."""

    name: str
    run_id: str
    uri: str
    prefix: str
    sha256: str

    @classmethod
    def from_artifact(cls, name: str, run_id: str, artifact: ArtifactRef) -> MergedModelRef:
        return cls(name, run_id, artifact.uri, artifact.prefix, artifact.sha256)

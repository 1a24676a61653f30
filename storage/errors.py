"""Error types shared by every layer.

User mistakes raise a :class:`MergelineError` subclass; the CLI prints its message on one
line and exits 2. Failures of the system raise :class:`SystemFailure` (exit 1).
"""

from __future__ import annotations


class MergelineError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


class SpecError(MergelineError):
    """The spec file is missing, malformed or invalid."""


class DataError(MergelineError):
    """A dataset is missing, unknown or unusable as requested."""


class ModelError(MergelineError):
    """A base model is missing, unknown or incompatible."""


class MergeInputError(MergelineError):
    """Task vectors do not match the base model (names, shapes, values) or bad merge params."""


class ArtifactError(MergelineError):
    """A stored artifact is missing, corrupt or fails its checksum."""


class ArtifactMissing(ArtifactError):
    """An artifact's file or manifest is not in the store. Named by a user, that is theirs to
    fix; read by a run that wrote or verified it earlier, the store lost it (a system
    failure, see :func:`pipelines.run.raysession.get`)."""

    def __init__(self, url: str, advice: str = "rebuild the artifact") -> None:
        super().__init__(f"{url} does not exist: {advice}")
        self.url, self.advice = url, advice

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses Ray's process boundary
        return type(self), (self.url, self.advice)


class ServiceError(MergelineError):
    """A service named in the spec (Ray, storage, tracking) cannot be reached."""


class SystemFailure(Exception):
    """A failure of the system, not the user: rerunning the same command resumes."""

    exit_code = 1

    def __init__(self, stage: str, cause: str) -> None:
        super().__init__(f"stage '{stage}' failed: {cause}. Rerun the same command to resume.")
        self.stage = stage


class StorageError(MergelineError):
    """The object store refused a request for good: no such bucket, access denied, no keys."""


class StorageUnavailable(SystemFailure):
    """The object store kept failing transiently (down, 5xx, throttling) past its retries."""

    def __init__(self, uri: str, cause: str) -> None:
        super().__init__("storage", f"{uri}: {cause}")
        self.uri, self.cause = uri, cause

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses Ray's process boundary
        return type(self), (self.uri, self.cause)


class LineageError(MergelineError):
    """A registered model version does not exist or carries no mergeline lineage."""

"""The base of every spec model (frozen, no unknown fields) and the checks sections share."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class SpecModel(BaseModel):
    """Frozen, and refuses unknown fields, as every section of a spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_endpoint_url(value: str | None, what: str) -> str | None:
    """An S3-compatible server's URL: http(s), no credentials in it."""
    if value is not None and not re.match(r"^https?://[^/]+", value):
        raise ValueError(f"{what} must be an http:// or https:// URL")
    return None if value is None else check_no_credentials(value, what)


def check_no_credentials(value: str, what: str) -> str:
    """``value`` if its host part holds no ``user:secret@``; S3 credentials come from the AWS
    environment only."""
    if has_credentials(value):
        raise ValueError(
            f"{what} must not contain credentials (user:secret@): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the environment instead"
        )
    return value


def has_credentials(value: str) -> bool:
    """Whether the host part of a URI (or the first part of a path) holds ``user:secret@``."""
    return "@" in value.split("://", 1)[-1].split("/", 1)[0]

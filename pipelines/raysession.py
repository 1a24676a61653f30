"""Starting or joining Ray, and turning remote failures into mergeline errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from storage.errors import MergelineError, ServiceError, SystemFailure


@contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """A local Ray started for this command (``address`` None) or an existing cluster."""
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"logging_level": logging.ERROR, "configure_logging": True}
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "a local Ray"
        raise ServiceError(
            f"cannot start or join Ray at {where}: {str(error).splitlines()[0]}: check "
            "compute.ray_address (null starts a local Ray)"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def get(refs: Any, stage: str) -> Any:
    """``ray.get`` that re-raises user errors as themselves and system failures as such."""
    try:
        return ray.get(refs)
    except RayTaskError as error:
        cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else None
        if isinstance(cause, MergelineError):
            raise cause from None
        raise SystemFailure(stage, _first_line(cause or error)) from None
    except RayError as error:
        raise SystemFailure(stage, _first_line(error)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"

"""Starting or joining Ray, and turning remote failures into mergeline errors."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from storage.errors import ArtifactMissing, MergelineError, ServiceError, SystemFailure


@contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """A local Ray started for this command (``address`` None) or an existing cluster."""
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"logging_level": logging.ERROR, "configure_logging": True}
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            # address="local": a fresh Ray for this command, even if `ray start` runs here
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                **options,
            )
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


class LazyRay:
    """Ray for one command, started (or joined) the first time a stage needs it: a rerun whose
    artifacts and scores are all stored never starts it. ``on_start`` runs right after the
    start (waiting until the cluster can place the run's requests)."""

    def __init__(
        self, address: str | None, num_cpus: int | None, on_start: Callable[[], None]
    ) -> None:
        self.address, self.num_cpus, self.on_start = address, num_cpus, on_start
        self._session: AbstractContextManager[None] | None = None

    @property
    def started(self) -> bool:
        return self._session is not None

    def ensure(self) -> None:
        if self._session is not None:
            return
        session = ray_session(self.address, self.num_cpus)
        session.__enter__()
        self._session = session
        self.on_start()

    def __enter__(self) -> LazyRay:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.__exit__(*exc)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail within ``timeout_s`` when a cluster address does not answer (Ray itself retries
    for minutes). ``auto`` needs a cluster started on this machine or ``RAY_ADDRESS``."""
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS", "")
        if not target:
            current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
            if not current.is_file():
                raise ServiceError(
                    "compute.ray_address is 'auto' but no Ray cluster runs on this machine and "
                    "RAY_ADDRESS is unset: start one with `ray start --head` or set the address"
                )
            target = current.read_text().strip()
    host_port = target.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ServiceError(
            f"compute.ray_address {address!r} is not host:port, ray://host:port or 'auto'"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ServiceError(
            f"Ray at {address} is unreachable ({error.strerror or error}): start the cluster "
            "or fix compute.ray_address (null starts a local Ray)"
        ) from None


def wait_any(refs: list[Any], poll_s: float = 0.25) -> list[Any]:
    """The refs that are ready (at least one). Polls, because a blocking ``ray.wait`` does
    not return to Python, so Ctrl-C would not stop the driver until a task finished."""
    while True:
        done, _ = ray.wait(refs, num_returns=1, timeout=poll_s)
        if done:
            return done


def get(refs: Any, stage: str) -> Any:
    """``ray.get`` that re-raises user errors as themselves and system failures as such
    (and, like :func:`wait_any`, lets Ctrl-C through while it waits)."""
    pending = refs if isinstance(refs, list) else [refs]
    try:
        while len(ray.wait(pending, num_returns=len(pending), timeout=0.25)[0]) < len(pending):
            pass
        return ray.get(refs)
    except RayTaskError as error:
        cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else None
        if isinstance(cause, ArtifactMissing):  # the run's own store lost it while it ran
            raise SystemFailure(
                stage,
                f"{cause.url} is gone from the store: an artifact this run wrote or checked "
                "was deleted while it ran (was the store wiped?)",
            ) from None
        if isinstance(cause, MergelineError | SystemFailure):  # e.g. storage down past retries
            raise cause from None
        raise SystemFailure(stage, _first_line(cause or error)) from None
    except RayError as error:
        raise SystemFailure(stage, _first_line(error)) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"

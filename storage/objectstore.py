"""An object store over fsspec: ``file://`` paths and ``s3://bucket/prefix``.

Writes of a single object are atomic for readers (local: write a temporary file, then rename;
S3: a PUT is atomic). Multi-file artifacts become visible through their manifest, see
:mod:`storage.artifacts`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Protocol

import fsspec

from storage.errors import ServiceError


class ObjectStore(Protocol):
    uri: str

    def url(self, key: str) -> str: ...
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def local_path(self, key: str) -> str | None: ...


class FsspecStore:
    """Keys are '/'-separated paths relative to the store's root URI."""

    def __init__(self, uri: str, endpoint_url: str | None = None) -> None:
        self.uri = uri.rstrip("/")
        scheme, _, rest = self.uri.partition("://")
        options: dict[str, object] = {}
        if scheme == "file":
            rest = str(Path(rest).expanduser().resolve())
            self.uri = f"file://{rest}"
        elif scheme == "s3" and endpoint_url:
            options["client_kwargs"] = {"endpoint_url": endpoint_url}
        self.scheme = scheme
        self.root = rest
        self.fs = fsspec.filesystem(scheme, **options)

    def url(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self.scheme == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temporary = f"{path}.{uuid.uuid4().hex}.partial"
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        else:
            self.fs.pipe_file(path, data)

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def list(self, prefix: str) -> list[str]:
        """Immediate children of ``prefix`` (names only), empty if it does not exist."""
        path = self._path(prefix).rstrip("/")
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def local_path(self, key: str) -> str | None:
        """A local filesystem path for memory-mapping, when the store is local."""
        return self._path(key) if self.scheme == "file" else None


def open_store(uri: str, endpoint_url: str | None = None) -> FsspecStore:
    try:
        return FsspecStore(uri, endpoint_url)
    except (OSError, ValueError, ImportError) as error:
        raise ServiceError(f"cannot open the object store {uri}: {error}") from None

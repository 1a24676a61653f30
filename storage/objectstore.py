"""An object store over fsspec: ``file://`` paths and ``s3://bucket/prefix``.

Writes of a single object are atomic for readers (local: write a temporary file, then rename;
S3: a PUT or a completed multipart upload is atomic). Small objects (manifests, JSON) go in and
out as ``bytes``; model-sized ones stream between a local file and the store in chunks
(:meth:`FsspecStore.upload`, :meth:`FsspecStore.download`), hashed on the way, so no object of
model size is ever held in memory. Multi-file artifacts become visible through their manifest, see
:mod:`storage.artifacts`; :meth:`FsspecStore.create` writes an object only if it is absent,
which is how two runs racing on one artifact end with exactly one manifest.

S3 credentials come only from the standard AWS chain (environment, profile, instance role):
this module never takes, logs or stores one. Every operation retries transient errors within
``retry_seconds`` (see :mod:`storage.retry`); the S3 client's own retries are off so that
bound holds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import fsspec

from storage.errors import ServiceError
from storage.retry import call_with_retries

T = TypeVar("T")

DEFAULT_RETRY_SECONDS = 60.0
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
CHUNK_BYTES = 4 * 1024 * 1024  # one read or write of a streamed object
# S3 part size: objects larger than this go up as multipart uploads of parts this large
# (S3 allows 10,000 parts, so up to 320 GiB per object); one part is buffered at a time.
DEFAULT_BLOCK_BYTES = 32 * 1024 * 1024


class ObjectStore(Protocol):
    uri: str

    def url(self, key: str) -> str: ...
    def put(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def get(self, key: str) -> bytes: ...
    def upload(self, key: str, source: str | Path, consume: bool = False) -> tuple[str, int]: ...
    def download(self, key: str, target: str | Path | None) -> tuple[str, int]: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def local_path(self, key: str) -> str | None: ...


class FsspecStore:
    """Keys are '/'-separated paths relative to the store's root URI."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        retry_seconds: float | None = None,
        block_size: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.retry_seconds = DEFAULT_RETRY_SECONDS if retry_seconds is None else retry_seconds
        self.block_size = block_size
        scheme, _, rest = self.uri.partition("://")
        options: dict[str, object] = {}
        if scheme == "file":
            rest = str(Path(rest).expanduser().resolve())
            self.uri = f"file://{rest}"
        elif scheme == "s3":
            options = {
                # A fresh client per store: it picks up the credentials of the environment now.
                "skip_instance_cache": True,
                "use_listings_cache": False,
                "config_kwargs": {
                    "retries": {"total_max_attempts": 1},
                    "connect_timeout": CONNECT_TIMEOUT_S,
                    "read_timeout": READ_TIMEOUT_S,
                },
            }
            if endpoint_url:
                options["client_kwargs"] = {"endpoint_url": endpoint_url}
        self.scheme = scheme
        self.root = rest
        self.fs = fsspec.filesystem(scheme, **options)
        if scheme == "s3":
            self.fs.retries = 1  # s3fs's own loop: one attempt, ours retries
        # Unsupported If-None-Match (HTTP 501): fall back to check-then-put, see create().
        self.conditional_create = scheme == "s3"

    def url(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _call(self, what: str, key: str, operation: Callable[[], T]) -> T:
        return call_with_retries(operation, self.url(key), what, self.retry_seconds)

    def put(self, key: str, data: bytes) -> None:
        """Write ``key``, replacing it if it exists."""
        path = self._path(key)
        if self.scheme == "file":
            self._call("write", key, lambda: _write_local(path, _writer(data), exclusive=False))
        else:
            self._call("write", key, lambda: self.fs.pipe_file(path, data))

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet; False if it already did.

        S3: ``PutObject`` with ``If-None-Match: *``, atomic on the server. A server that does
        not implement it (HTTP 501) gets check-then-put, which two simultaneous writers can
        both pass; readers still verify every file's sha256. Local: the data goes to a
        temporary file, then ``os.link`` to the final name, which fails if that exists.
        """
        path = self._path(key)
        try:
            if self.scheme == "file":
                self._call("create", key, lambda: _write_local(path, _writer(data), exclusive=True))
            elif self.conditional_create:
                try:
                    self._call("create", key, lambda: self.fs.pipe_file(path, data, mode="create"))
                except NotImplementedError:
                    self.conditional_create = False
                    return self.create(key, data)
            else:
                if self.exists(key):
                    return False
                self.put(key, data)
        except FileExistsError:
            return False
        return True

    def get(self, key: str) -> bytes:
        """The object's bytes; ``FileNotFoundError`` if it does not exist."""
        path = self._path(key)
        return self._call("read", key, lambda: self.fs.cat_file(path))

    def upload(self, key: str, source: str | Path, consume: bool = False) -> tuple[str, int]:
        """Write ``key`` from the local file ``source`` in chunks, replacing it if it exists;
        returns the (sha256, size) of what was written, computed while streaming.

        S3: one PUT, or a multipart upload of ``block_size`` parts for a larger file; a
        failed upload is aborted, so no partial object ever becomes visible. Local: with
        ``consume`` (the caller will neither change nor keep ``source``), a file on the
        store's filesystem is hard-linked into place instead of copied.
        """
        path = self._path(key)
        if self.scheme == "file":
            if consume:
                linked = self._call("write", key, lambda: _link_local(source, path))
                if linked is not None:
                    return linked
            return self._call("write", key, lambda: _copy_local(source, path))
        return self._call("write", key, lambda: self._upload_remote(source, path))

    def _upload_remote(self, source: str | Path, path: str) -> tuple[str, int]:
        hasher, size = hashlib.sha256(), 0
        target = self.fs.open(path, "wb", block_size=self.block_size)
        try:
            with open(source, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    hasher.update(chunk)
                    target.write(chunk)
                    size += len(chunk)
        except BaseException:
            with contextlib.suppress(Exception):
                target.discard()  # abort the multipart upload
            target.closed = True  # closing would complete the upload with what it has
            raise
        target.close()
        return hasher.hexdigest(), size

    def download(self, key: str, target: str | Path | None) -> tuple[str, int]:
        """Stream ``key`` in chunks into the local file ``target`` (or only hash it when
        ``target`` is None); returns its (sha256, size). ``target`` appears complete or not
        at all. ``FileNotFoundError`` if ``key`` does not exist."""
        path = self._path(key)
        return self._call("read", key, lambda: self._download(path, target))

    def _download(self, path: str, target: str | Path | None) -> tuple[str, int]:
        hasher, size = hashlib.sha256(), 0
        partial = None if target is None else f"{target}.{uuid.uuid4().hex}.partial"
        if target is not None:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        try:
            with (
                self.fs.open(path, "rb", block_size=self.block_size) as source,
                open(partial, "wb") if partial else contextlib.nullcontext() as copy,
            ):
                while chunk := source.read(CHUNK_BYTES):
                    hasher.update(chunk)
                    size += len(chunk)
                    if copy is not None:
                        copy.write(chunk)
            if partial is not None:
                os.replace(partial, target)
        finally:
            if partial is not None and os.path.exists(partial):
                os.unlink(partial)
        return hasher.hexdigest(), size

    def delete(self, key: str) -> None:
        """Remove ``key``; nothing happens if it does not exist."""
        path = self._path(key)
        try:
            self._call("delete", key, lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return bool(self._call("check", key, lambda: self.fs.exists(path)))

    def size(self, key: str) -> int:
        """The object's size in bytes; ``FileNotFoundError`` if it does not exist."""
        path = self._path(key)
        return int(self._call("check", key, lambda: self.fs.size(path)))

    def list(self, prefix: str) -> list[str]:
        """Immediate children of ``prefix`` (names only), empty if it does not exist."""
        path = self._path(prefix).rstrip("/")
        try:
            found = self._call("list", prefix, lambda: self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in found}
        return sorted(name for name in names if name and not name.endswith(".partial"))

    def local_path(self, key: str) -> str | None:
        """A local filesystem path for memory-mapping, when the store is local."""
        return self._path(key) if self.scheme == "file" else None


def _writer(data: bytes) -> Callable[[BinaryIO], None]:
    def fill(handle: BinaryIO) -> None:
        handle.write(data)

    return fill


def _copy_local(source: str | Path, path: str) -> tuple[str, int]:
    """Copy the file ``source`` to ``path`` in chunks (atomically); its (sha256, size)."""
    hasher, sizes = hashlib.sha256(), []

    def copy(target: BinaryIO) -> None:
        with open(source, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                hasher.update(chunk)
                target.write(chunk)
                sizes.append(len(chunk))

    _write_local(path, copy, exclusive=False)
    return hasher.hexdigest(), sum(sizes)


def _link_local(source: str | Path, path: str) -> tuple[str, int] | None:
    """Hard-link ``source`` to ``path`` (atomically, once on disk); its (sha256, size). None
    where a link cannot be made (another filesystem, no hard links): copy instead."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        os.link(source, temporary)
    except OSError as error:
        if error.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            return None
        raise
    try:
        hasher, size = hashlib.sha256(), 0
        with open(temporary, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                hasher.update(chunk)
                size += len(chunk)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return hasher.hexdigest(), size


def _write_local(path: str, fill: Callable[[BinaryIO], None], exclusive: bool) -> None:
    """Write through a temporary file so that no reader sees a partial object; ``fill``
    writes the content into the open file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{uuid.uuid4().hex}.partial"
    with open(temporary, "wb") as handle:
        fill(handle)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        if not exclusive:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)  # atomic, and fails if ``path`` exists
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            _create_exclusive(path, fill)  # no hard links here (some network filesystems)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _create_exclusive(path: str, fill: Callable[[BinaryIO], None]) -> None:
    """``O_EXCL`` create: readers may briefly see a partial file (a manifest that does not
    parse counts as absent, so it stays invisible until complete)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        fill(handle)
        handle.flush()
        os.fsync(handle.fileno())


def open_store(
    uri: str,
    endpoint_url: str | None = None,
    retry_seconds: float | None = None,
    block_size: int = DEFAULT_BLOCK_BYTES,
) -> FsspecStore:
    try:
        return FsspecStore(uri, endpoint_url, retry_seconds, block_size)
    except (OSError, ValueError, ImportError) as error:
        raise ServiceError(f"cannot open the object store {uri}: {error}") from None


def open_store_from(config: Mapping[str, Any]) -> FsspecStore:
    """The store a stage's ``store_cfg`` names: ``uri``, ``endpoint_url``, ``retry_seconds``."""
    return open_store(config["uri"], config.get("endpoint_url"), config.get("retry_seconds"))

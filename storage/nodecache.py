"""A node-local copy of an artifact's file, downloaded once per node and checked once.

Scorers and publish read θ0 and the task vectors tensor by tensor from safetensors files on
local disk (:class:`storage.shards.SafetensorsReader`), never as whole state dicts. A file in a
``file://`` store is read where it is, after its sha256 is checked against the manifest (once
per process). A file in a remote store (S3) is streamed into the node cache,
``$MERGELINE_CACHE/objects/`` (default ``~/.cache/mergeline``), named by its sha256: every
actor on the node shares that copy, a lock file makes concurrent actors download it once, and a
copy is trusted only if it was renamed into place after its sha256 matched.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from storage.artifacts import expected_entry, verified_download
from storage.objectstore import ObjectStore

_checked: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process
_lock = threading.Lock()


def cache_home() -> Path:
    """This node's mergeline cache: ``$MERGELINE_CACHE``, default ``~/.cache/mergeline``."""
    return Path(os.environ.get("MERGELINE_CACHE", "~/.cache/mergeline")).expanduser()


def cache_root() -> Path:
    """Where node-local copies live: ``$MERGELINE_CACHE/objects``."""
    return cache_home() / "objects"


def local_file(store: ObjectStore, prefix: str, name: str) -> Path:
    """A local path holding file ``name`` of the artifact at ``prefix``, its sha256 checked
    against the artifact's manifest."""
    expected = expected_entry(store, prefix, name)
    key = f"{prefix}/{name}"
    local = store.local_path(key)
    if local is not None:
        path = Path(local)
        stat = path.stat()
        marker = (str(path), stat.st_size, stat.st_mtime_ns)
        with _lock:
            known = _checked.get(marker)
        if known != expected["sha256"]:
            verified_download(store, key, expected, None)
            with _lock:
                _checked[marker] = expected["sha256"]
        return path
    return _cached_copy(store, key, expected)


def _cached_copy(store: ObjectStore, key: str, expected: dict) -> Path:
    sha256 = expected["sha256"]
    folder = cache_root() / sha256[:2]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / sha256
    if _complete(target, expected):
        return target
    with open(folder / f"{sha256}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another actor on this node may be downloading it
        if _complete(target, expected):
            return target
        partial = folder / f"{sha256}.{os.getpid()}.part"
        try:
            verified_download(store, key, expected, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _complete(path: Path, expected: dict) -> bool:
    """A copy is renamed into place only after its sha256 matched: its size confirms it."""
    try:
        return path.stat().st_size == expected["size"]
    except FileNotFoundError:
        return False

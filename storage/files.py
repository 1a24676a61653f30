"""Users' own files by URI (a local path, ``file://`` or ``s3://``): bytes in, nothing parsed.

The edge (``pipelines.stages.datasets``) reads a ``files`` dataset's train / val / test files
through :func:`read_bytes` and hands the bytes to :mod:`workers.data.files`, which parses them;
only this module talks to fsspec for them. S3
credentials come only from the standard AWS chain; ``endpoint_url`` names an S3-compatible
server (MinIO) for the files (``AWS_ENDPOINT_URL`` in the environment works too).
"""

from __future__ import annotations

import re
from pathlib import Path

from storage.errors import DataError
from storage.objectstore import open_store

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative local path made absolute (against the current directory).

    Ray workers do not share the driver's working directory, so a spec's relative paths are
    resolved once, where the spec is loaded (:mod:`pipelines.spec.load`). ``s3://`` URIs are
    returned unchanged.
    """
    path = local_path(uri)
    return uri if path is None else str(Path(path).expanduser().resolve())


def local_path(uri: str) -> str | None:
    """The local path ``uri`` names (``file://`` dropped), ``None`` for an ``s3://`` URI;
    ``ValueError`` for any other scheme. Pure: nothing on disk is looked at."""
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else None
    if scheme == "s3":
        return None
    if scheme not in (None, "file"):
        raise ValueError(f"{uri!r}: use a local path, a file:// URI or an s3:// URI")
    return uri[len("file://") :] if scheme == "file" else uri


def read_bytes(
    uri: str, endpoint_url: str | None = None, retry_seconds: float | None = None
) -> bytes:
    """The whole content of the file at ``uri``; a :class:`DataError` naming it if absent.

    Transient S3 errors are retried within ``retry_seconds`` like every store operation.
    """
    location = absolute_uri(uri)
    if not location.startswith("s3://"):
        path = Path(location)
        if path.is_dir():
            raise DataError(f"{uri} is a directory: name a file (.jsonl, .csv, .parquet, .npz)")
        if not path.is_file():
            raise DataError(f"{uri} does not exist: check the path")
        return path.read_bytes()
    parent, _, name = location.rpartition("/")
    if not name or parent == "s3:/":
        raise DataError(f"{uri} does not name a file: use s3://bucket/path/to/file")
    try:
        return open_store(parent, endpoint_url, retry_seconds).get(name)
    except FileNotFoundError:
        raise DataError(f"{uri} does not exist: check the bucket and key") from None


def main(argv: list[str] | None = None) -> None:
    """``python -m storage.files URI PATH``: copy one file to a local path.

    A RayJob uses it to fetch its spec from S3 before ``mergeline run``.
    """
    import argparse
    import os
    import sys

    from storage.errors import MergelineError

    parser = argparse.ArgumentParser(prog="python -m storage.files", description=main.__doc__)
    parser.add_argument("uri", help="a local path, file:// or s3:// URI")
    parser.add_argument("path", type=Path, help="where to write the file")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"))
    args = parser.parse_args(argv)
    try:
        data = read_bytes(args.uri, args.endpoint_url)
    except MergelineError as error:
        sys.exit(f"error: {error}")
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_bytes(data)


if __name__ == "__main__":
    main()

"""Which object-store errors are worth retrying, and retrying them within a bounded time.

Transient: the connection was refused, reset or timed out; the server answered 5xx or asked
us to slow down (429, ``SlowDown``, ``Throttling``). Permanent: everything the user must fix
(no such bucket, access denied, no credentials) and every other client error; they fail at
once with a one-line :class:`StorageError` naming the URI. The S3 clients' own retries are
turned off (see :mod:`storage.objectstore`) so that this module alone bounds the total time.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

from storage.errors import StorageError, StorageUnavailable

log = logging.getLogger("mergeline.storage")

T = TypeVar("T")
ErrorKind = Literal["missing", "exists", "unsupported", "transient", "permanent"]

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 10.0

_THROTTLING_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
}
_ACCESS_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "403",
}


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from (s3fs wraps botocore's in OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _client_error(error: BaseException) -> tuple[str, int] | None:
    """(error code, HTTP status) of the first S3 error response in the chain."""
    for item in _chain(error):
        response = getattr(item, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code, status
    return None


def _is_network_error(error: BaseException) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from botocore.parsers import ResponseParserError

    network: tuple[type[BaseException], ...] = (
        BotoConnectionError,  # refused, DNS, connect timeout
        HTTPClientError,  # connection closed or reset, read timeout
        ResponseParserError,  # throttling answers with broken XML (s3fs issue 484)
        ConnectionError,  # the built-in: reset, refused, broken pipe
        TimeoutError,
        asyncio.TimeoutError,
        http.client.IncompleteRead,
    )
    try:
        import aiohttp

        network += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    except ImportError:  # pragma: no cover - s3fs always brings aiohttp
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        network += (FSTimeoutError,)
    except ImportError:  # pragma: no cover
        pass
    return any(isinstance(item, network) for item in _chain(error))


def _is_store_error(error: BaseException) -> bool:
    """Raised by the filesystem or the S3 client, as opposed to a bug in the caller."""
    from botocore.exceptions import BotoCoreError, ClientError

    return any(isinstance(item, OSError | BotoCoreError | ClientError) for item in _chain(error))


def classify_error(error: BaseException) -> ErrorKind:
    """What a store operation's exception means for the caller."""
    response = _client_error(error)
    if response is not None:
        code, status = response
        if code in ("NoSuchKey", "404"):
            return "missing"
        if code == "PreconditionFailed" or status == 412:
            return "exists"
        if code == "NotImplemented" or status == 501:
            return "unsupported"
        if code in _THROTTLING_CODES or status == 429 or status >= 500:
            return "transient"
        return "permanent"
    if isinstance(error, FileExistsError):
        return "exists"
    if isinstance(error, FileNotFoundError):
        return "missing"
    if _is_network_error(error):
        return "transient"
    return "permanent"


def describe_permanent(error: BaseException, uri: str) -> str:
    """One line saying what is wrong with ``uri`` and how to fix it; never a credential."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if any(isinstance(e, NoCredentialsError | PartialCredentialsError) for e in _chain(error)):
        return (
            f"{uri}: no AWS credentials found: export AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE (credentials never go in the spec)"
        )
    response = _client_error(error)
    if response is not None:
        code, status = response
        if code == "NoSuchBucket":
            bucket = uri.removeprefix("s3://").split("/", 1)[0]
            return f"{uri}: the bucket '{bucket}' does not exist: create it or fix storage.uri"
        if code in _ACCESS_CODES or status == 403:
            return (
                f"{uri}: access denied ({code or status}): give the AWS credentials of the "
                "environment/profile access to it, or fix storage.uri"
            )
        return f"{uri}: the object store refused the request ({code or status})"
    if isinstance(error, PermissionError):
        return f"{uri}: permission denied: make it writable or fix storage.uri"
    if isinstance(error, OSError) and error.strerror:
        return f"{uri}: {error.strerror}: check storage.uri"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{uri}: {type(error).__name__}: {first}"


def call_with_retries(operation: Callable[[], T], uri: str, what: str, retry_seconds: float) -> T:
    """Run ``operation``; retry transient errors with exponential backoff and jitter.

    ``FileNotFoundError`` and ``FileExistsError`` (and ``NotImplementedError`` for a request
    the server does not implement) go to the caller; permanent store errors raise
    :class:`StorageError` at once; transient ones raise :class:`StorageUnavailable` once the
    next wait would end more than ``retry_seconds`` after the first attempt.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return operation()
        except Exception as error:
            kind = classify_error(error)
            if kind == "missing":
                raise FileNotFoundError(uri) from None
            if kind == "exists":
                raise FileExistsError(uri) from None
            if kind == "unsupported":
                raise NotImplementedError(uri) from None
            if kind == "permanent":
                if not _is_store_error(error):
                    raise  # a bug, not the store: keep its traceback
                raise StorageError(describe_permanent(error, uri)) from None
            delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2**attempt) * random.uniform(0.5, 1.0)
            elapsed = time.monotonic() - started
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            if elapsed + delay > retry_seconds:
                raise StorageUnavailable(
                    uri, f"{what} failed for {elapsed:.0f}s ({reason})"
                ) from None
            attempt += 1
            log.warning("%s %s failed (%s); retry %d in %.1fs", what, uri, reason, attempt, delay)
            time.sleep(delay)

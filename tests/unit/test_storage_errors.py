"""Which store errors are retried, which fail at once, and the file:// conditional create."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from s3fs.errors import translate_boto_error

from storage.artifacts import find_artifact, verify_artifact, write_artifact
from storage.errors import StorageError, StorageUnavailable
from storage.objectstore import open_store
from storage.retry import call_with_retries, classify_error, describe_permanent


def _client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, operation)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "transient"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "transient"),
        (_client_error("SlowDown", 503), "transient"),
        (_client_error("InternalError", 500), "transient"),
        (_client_error("Throttling", 400), "transient"),
        (_client_error("TooManyRequests", 429), "transient"),
        (_client_error("NoSuchBucket", 404), "permanent"),
        (_client_error("AccessDenied", 403), "permanent"),
        (_client_error("InvalidAccessKeyId", 403), "permanent"),
        (_client_error("NoSuchKey", 404, "GetObject"), "missing"),
        (_client_error("PreconditionFailed", 412), "exists"),
        (_client_error("NotImplemented", 501), "unsupported"),
        (NoCredentialsError(), "permanent"),
        (PermissionError(errno.EACCES, "denied"), "permanent"),
        (FileNotFoundError("gone"), "missing"),
    ],
)
def test_errors_are_classified_as_raised_and_as_s3fs_translates_them(
    error: Exception, kind: str
) -> None:
    assert classify_error(error) == kind
    assert classify_error(translate_boto_error(error)) == kind  # OSError wrapping the response


def test_permanent_errors_name_the_uri_on_one_line_without_the_response_text() -> None:
    uri = "s3://no-such/prefix/task-vectors/k/manifest.json"
    text = describe_permanent(translate_boto_error(_client_error("NoSuchBucket", 404)), uri)
    assert text.startswith(uri) and "'no-such' does not exist" in text and "\n" not in text
    denied = describe_permanent(_client_error("AccessDenied", 403), uri)
    assert "access denied (AccessDenied)" in denied
    assert "AWS_ACCESS_KEY_ID" in describe_permanent(NoCredentialsError(), uri)


def test_transient_errors_are_retried_until_the_operation_succeeds() -> None:
    outcomes: list[Exception | None] = [
        ConnectionResetError(),
        _client_error("SlowDown", 503),
        None,
    ]

    def operation() -> str:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return "done"

    assert call_with_retries(operation, "s3://b/k", "write", retry_seconds=30) == "done"
    assert outcomes == []


def test_permanent_errors_are_not_retried() -> None:
    calls = []

    def operation() -> None:
        calls.append(1)
        raise translate_boto_error(_client_error("AccessDenied", 403))

    with pytest.raises(StorageError, match=r"^s3://b/k: access denied"):
        call_with_retries(operation, "s3://b/k", "write", retry_seconds=30)
    assert calls == [1]


def test_transient_errors_past_the_budget_are_a_system_failure() -> None:
    def operation() -> None:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    with pytest.raises(StorageUnavailable, match="s3://b/k: write failed") as raised:
        call_with_retries(operation, "s3://b/k", "write", retry_seconds=0.5)
    assert raised.value.stage == "storage"


def test_local_create_is_exclusive_and_never_shows_a_partial_file(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    assert store.create("a/manifest.json", b"first") is True
    assert store.create("a/manifest.json", b"second") is False
    assert store.get("a/manifest.json") == b"first"
    assert os.listdir(tmp_path / "store" / "a") == ["manifest.json"]  # no temporary left


def test_local_writer_takes_over_an_artifact_whose_files_changed(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    write_artifact(store, "tv", {"d": b"first"}, {"n": 1})
    (tmp_path / "store" / "tv" / "d").write_bytes(b"clobbered")
    assert "checksum" in (verify_artifact(store, "tv") or "")
    write_artifact(store, "tv", {"d": b"second"}, {"n": 2})
    assert verify_artifact(store, "tv") is None and find_artifact(store, "tv").meta == {"n": 2}


def test_an_intact_artifact_is_not_rewritten(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    first = write_artifact(store, "tv", {"d": b"first"}, {"n": 1})
    again = write_artifact(store, "tv", {"d": b"other"}, {"n": 2})
    assert again == first and store.get("tv/d") == b"first"

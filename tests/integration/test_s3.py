"""The object store against a real S3 HTTP API (moto's threaded server on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from storage.artifacts import find_artifact, verify_artifact, write_artifact
from storage.digest import digest_state
from storage.errors import ArtifactError, StorageError, StorageUnavailable
from storage.objectstore import FsspecStore, open_store
from storage.staged import TensorFile
from storage.taskvectors import (
    find_task_vector,
    merged_tensors,
    read_task_vector,
    write_adapter_task_vector,
    write_merged_model,
    write_task_vector,
)
from tests.conftest_s3 import BUCKET, S3Server

pytestmark = pytest.mark.integration

DELTA = {"layers.0.weight": torch.randn(16, 8), "layers.0.bias": torch.randn(16)}
HEAD = {"weight": torch.randn(3, 16), "bias": torch.zeros(3)}


def _store(s3_server: S3Server, uri: str, retry_seconds: float = 30.0) -> FsspecStore:
    return open_store(uri, s3_server.endpoint, retry_seconds)


def _key(uri: str, name: str) -> str:
    return uri.removeprefix(f"s3://{BUCKET}/") + "/" + name


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mergeline.storage"]


def test_task_vector_round_trip(s3_server: S3Server, s3_uri: str) -> None:
    store = _store(s3_server, s3_uri)
    ref = write_task_vector(store, "k1", DELTA, HEAD, {"task": "a", "mode": "standard"})
    assert ref.uri == f"{s3_uri}/task-vectors/k1"

    found = find_task_vector(store, "k1")
    assert found is not None and (found.sha256, found.meta) == (ref.sha256, ref.meta)
    delta, head = read_task_vector(store, "k1")
    assert digest_state(delta) == digest_state(DELTA) and torch.equal(head["bias"], HEAD["bias"])
    stored = sorted(k for k in s3_server.keys() if k.startswith(_key(s3_uri, "")))
    assert [k.rsplit("/", 1)[1] for k in stored] == [
        "delta.safetensors",
        "head.safetensors",
        "manifest.json",
    ]


def test_a_prefix_without_a_valid_manifest_is_invisible(s3_server: S3Server, s3_uri: str) -> None:
    store = _store(s3_server, s3_uri)
    write_task_vector(store, "k2", DELTA, HEAD, {"task": "b"})
    s3_server.client().delete_object(
        Bucket=BUCKET, Key=_key(s3_uri, "task-vectors/k2/manifest.json")
    )
    s3_server.client().put_object(
        Bucket=BUCKET, Key=_key(s3_uri, "task-vectors/k3/manifest.json"), Body=b"{not json"
    )
    assert find_task_vector(store, "k2") is None
    assert find_task_vector(store, "k3") is None
    with pytest.raises(ArtifactError, match="does not exist"):
        read_task_vector(store, "k2")


def test_a_corrupted_object_is_detected_naming_it(s3_server: S3Server, s3_uri: str) -> None:
    store = _store(s3_server, s3_uri)
    write_task_vector(store, "k4", DELTA, HEAD, {"task": "c"})
    key = _key(s3_uri, "task-vectors/k4/delta.safetensors")
    body = bytearray(s3_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # same size, one flipped byte
    s3_server.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(body))

    with pytest.raises(ArtifactError, match=r"delta\.safetensors: checksum mismatch") as raised:
        read_task_vector(store, "k4")
    assert f"{s3_uri}/task-vectors/k4/delta.safetensors" in str(raised.value)
    problem = verify_artifact(store, "task-vectors/k4")
    assert problem is not None and "checksum" in problem


def test_the_manifest_is_created_only_if_absent(s3_server: S3Server, s3_uri: str) -> None:
    store = _store(s3_server, s3_uri)
    assert store.create("x/manifest.json", b"first") is True
    assert store.create("x/manifest.json", b"second") is False  # If-None-Match: * refused it
    assert store.get("x/manifest.json") == b"first"
    assert store.conditional_create  # moto implements conditional writes: no fallback used


def test_racing_writers_leave_one_intact_artifact(s3_server: S3Server, s3_uri: str) -> None:
    """Deterministic fine-tuning gives racers the same bytes: one manifest, every ref equal."""
    refs, failures = [], []

    def write() -> None:
        try:
            refs.append(write_artifact(_store(s3_server, s3_uri), "tv", {"d": b"x" * 999}, {}))
        except Exception as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len({ref.sha256 for ref in refs}) == 1
    assert verify_artifact(_store(s3_server, s3_uri), "tv") is None


def test_a_writer_takes_over_an_artifact_whose_files_no_longer_match(
    s3_server: S3Server, s3_uri: str
) -> None:
    """A racer's data files replaced the winner's: the next writer makes it whole again."""
    store = _store(s3_server, s3_uri)
    first = write_artifact(store, "tv", {"d": b"first bytes"}, {"n": 1})
    store.put("tv/d", b"racer bytes")  # the loser's data write landed after the manifest
    assert verify_artifact(store, "tv") is not None

    second = write_artifact(store, "tv", {"d": b"second bytes"}, {"n": 2})
    assert second.sha256 != first.sha256
    found = find_artifact(store, "tv")
    assert found is not None and found.meta == {"n": 2}
    assert verify_artifact(store, "tv") is None


def test_an_upload_survives_the_server_restarting_in_the_middle(
    s3_server: S3Server, s3_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server goes down after the first file of three and comes back once a request has
    failed against it (the retry's warning is the signal, not a timer); the retries carry
    the write."""

    class StopsAfterFirstUpload(FsspecStore):
        stopped = False

        def upload(self, key: str, source: str | Path, consume: bool = False) -> tuple[str, int]:
            written = super().upload(key, source, consume)
            if not self.stopped:
                self.stopped = True
                s3_server.stop()
            return written

    class RestartOnFirstFailure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not s3_server.running and "failed" in record.getMessage():
                s3_server.start()

    store = StopsAfterFirstUpload(s3_uri, s3_server.endpoint, retry_seconds=60)
    caplog.set_level(logging.WARNING, "mergeline.storage")
    restarter = RestartOnFirstFailure(logging.WARNING)
    logging.getLogger("mergeline.storage").addHandler(restarter)
    try:
        ref = write_task_vector(store, "k5", DELTA, HEAD, {"task": "d"})
    finally:
        logging.getLogger("mergeline.storage").removeHandler(restarter)
        if not s3_server.running:
            s3_server.start()
    assert store.stopped
    assert any("failed" in message and s3_uri in message for message in _retries(caplog))
    delta, _ = read_task_vector(_store(s3_server, s3_uri), "k5")
    assert digest_state(delta) == digest_state(DELTA)
    assert find_task_vector(store, "k5").sha256 == ref.sha256


def test_a_server_down_past_the_retry_budget_is_a_system_failure(
    s3_server: S3Server, s3_uri: str
) -> None:
    store = _store(s3_server, s3_uri, retry_seconds=1.0)
    s3_server.stop()
    try:
        with pytest.raises(StorageUnavailable, match="Rerun the same command") as raised:
            store.put("a/b", b"data")
    finally:
        s3_server.start()
    assert f"{s3_uri}/a/b" in str(raised.value) and "EndpointConnectionError" in str(raised.value)


def test_a_missing_bucket_fails_at_once_with_one_line(
    s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/prefix"
    store = _store(s3_server, uri, retry_seconds=600)
    caplog.set_level(logging.WARNING, "mergeline.storage")
    with pytest.raises(StorageError) as raised:
        write_task_vector(store, "k6", DELTA, HEAD, {})
    message = str(raised.value)
    assert message.startswith(f"{uri}/task-vectors/k6/") and "does not exist" in message
    assert "\n" not in message
    assert _retries(caplog) == []  # permanent: not a single retry

    result = CliRunner().invoke(app, ["ls", "--store", uri, "--endpoint-url", s3_server.endpoint])
    assert isinstance(result.exception, StorageError) and uri in str(result.exception)


@pytest.fixture
def read_only_user(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch):
    """Credentials of an IAM user who may only read the bucket; IAM enforced meanwhile."""
    iam = s3_server.client("iam")
    name = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
            }
        ],
    }
    iam.put_user_policy(UserName=name, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    s3_server.set_iam_enforcement(True)
    try:
        yield key
    finally:
        s3_server.set_iam_enforcement(False)


def test_access_denied_fails_at_once_with_one_line(
    s3_server: S3Server, s3_uri: str, read_only_user: dict, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(s3_server, s3_uri, retry_seconds=600)
    caplog.set_level(logging.WARNING, "mergeline.storage")
    assert store.list("task-vectors") == []  # reading is allowed
    with pytest.raises(StorageError) as raised:
        write_task_vector(store, "k7", DELTA, HEAD, {})
    message = str(raised.value)
    assert message.startswith(f"{s3_uri}/task-vectors/k7/") and "access denied" in message
    assert "\n" not in message and read_only_user["SecretAccessKey"] not in message
    assert _retries(caplog) == []


def test_unknown_credentials_are_refused_with_one_line(
    s3_server: S3Server, s3_uri: str, read_only_user: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOBODYKNOWSTHIS1")
    with pytest.raises(StorageError, match="access denied") as raised:
        _store(s3_server, s3_uri).get("anything")
    assert str(raised.value).startswith(f"{s3_uri}/anything:")


def test_ls_lists_task_vectors_and_merged_models(s3_server: S3Server, s3_uri: str) -> None:
    store = _store(s3_server, s3_uri)
    meta = {"task": "t1", "mode": "linear", "base_digest": "b" * 64, "dataset_digest": "d" * 64}
    vector = write_task_vector(store, "k8", DELTA, HEAD, meta)
    write_task_vector(store, "k9", DELTA, HEAD, meta | {"task": "t2"})
    store.delete("task-vectors/k9/manifest.json")  # unfinished: invisible
    tensors = TensorFile(merged_tensors(DELTA, {"t1": HEAD}))
    model = write_merged_model(
        store, "digits", "run-1", tensors, {}, {"candidate": {"method": "ties"}}
    )
    args = ["ls", "--store", s3_uri, "--endpoint-url", s3_server.endpoint]

    listed = CliRunner().invoke(app, [*args, "--json"])
    assert listed.exit_code == 0, listed.output
    listing = json.loads(listed.stdout)
    [row] = listing["task_vectors"]
    assert (row["task"], row["mode"], row["base_digest"]) == ("t1", "linear", "b" * 64)
    assert (row["uri"], row["sha256"]) == (vector.uri, vector.sha256)
    assert row["size"] > 0 and row["created"]
    [merged] = listing["models"]
    assert (merged["name"], merged["run_id"], merged["method"]) == ("digits", "run-1", "ties")
    assert merged["uri"] == model.uri

    table = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "t1" in table.stdout and "t2" not in table.stdout
    assert "ddddddddddd" in table.stdout and "run-1" in table.stdout


def test_ls_shows_an_adapter_s_size_and_the_dense_size_it_stands_for(
    s3_server: S3Server, s3_uri: str
) -> None:
    from workers.adapters.factors import Factor, LoraDelta, factors_to_tensors

    store = _store(s3_server, s3_uri)
    factors = {"layers.0.weight": Factor(torch.randn(2, 8), torch.randn(16, 2), 2.0)}
    view = LoraDelta(factors, DELTA)
    meta = {"task": "dense1", "mode": "standard", "base_digest": "b" * 64}
    write_task_vector(store, "k10", DELTA, HEAD, meta)
    sizes = {"adapter_bytes": view.adapter_bytes, "dense_bytes": view.dense_bytes}
    lora = meta | sizes | {"task": "lora1", "format": "lora"}
    write_adapter_task_vector(store, "k11", factors_to_tensors(factors), HEAD, lora)
    args = ["ls", "--store", s3_uri, "--endpoint-url", s3_server.endpoint]

    listed = CliRunner().invoke(app, [*args, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["task"]: row for row in json.loads(listed.stdout)["task_vectors"]}
    adapter, dense = rows["lora1"], rows["dense1"]
    assert (adapter["format"], adapter["adapter_bytes"]) == ("lora", 4 * (16 + 32 + 1))
    assert adapter["dense_bytes"] == 4 * (16 * 8 + 16) and adapter["size"] > 0
    assert (dense["format"], dense["adapter_bytes"], dense["dense_bytes"]) == ("dense", None, None)

    table = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    [adapter_line] = [line for line in table.stdout.splitlines() if "lora1" in line]
    assert "(adapter of 576 B dense)" in adapter_line
    [dense_line] = [line for line in table.stdout.splitlines() if "dense1" in line]
    assert "adapter" not in dense_line

"""Streaming through a real S3 API (moto's server): multipart uploads and checked reads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from storage.errors import ArtifactError
from storage.objectstore import open_store
from storage.taskvectors import (
    read_task_vector,
    task_vector_file,
    task_vector_prefix,
    write_task_vector,
)
from tests.conftest_s3 import BUCKET, S3Server

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _key(uri: str, key: str) -> str:
    return uri.removeprefix(f"s3://{BUCKET}/") + "/" + key


def test_a_file_larger_than_a_part_goes_up_in_parts_and_comes_back_whole(
    s3_server: S3Server, s3_uri: str, tmp_path: Path
) -> None:
    store = open_store(s3_uri, s3_server.endpoint, 30.0, block_size=5 * MiB)
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(12 * MiB + 3))
    expected = (hashlib.sha256(source.read_bytes()).hexdigest(), 12 * MiB + 3)

    assert store.upload("big/model.bin", source) == expected
    head = s3_server.client().head_object(Bucket=BUCKET, Key=_key(s3_uri, "big/model.bin"))
    assert head["ContentLength"] == expected[1]
    parts = head["ETag"].strip('"').rpartition("-")[2]
    assert parts.isdigit() and int(parts) >= 2  # a multipart upload ("<md5>-<parts>")
    assert store.download("big/model.bin", tmp_path / "back/model.bin") == expected
    assert (tmp_path / "back/model.bin").read_bytes() == source.read_bytes()
    assert store.download("big/model.bin", None) == expected


def test_a_small_file_is_one_put(s3_server: S3Server, s3_uri: str, tmp_path: Path) -> None:
    store = open_store(s3_uri, s3_server.endpoint, 30.0, block_size=5 * MiB)
    source = tmp_path / "small.bin"
    source.write_bytes(b"x" * 1000)
    assert store.upload("small.bin", source) == (hashlib.sha256(b"x" * 1000).hexdigest(), 1000)
    head = s3_server.client().head_object(Bucket=BUCKET, Key=_key(s3_uri, "small.bin"))
    assert "-" not in head["ETag"]


def test_a_task_vector_streams_through_s3_and_a_changed_object_is_refused(
    s3_server: S3Server, s3_uri: str
) -> None:
    store = open_store(s3_uri, s3_server.endpoint, 30.0, block_size=5 * MiB)
    delta = {"w": torch.randn(3 * MiB)}  # 12 MB: a multipart upload
    head = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
    write_task_vector(store, "k", delta, head, {"task": "t"})
    read, _ = read_task_vector(store, "k")
    assert torch.equal(read["w"], delta["w"])

    key = _key(s3_uri, f"{task_vector_prefix('k')}/delta.safetensors")
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-1] ^= 0xFF  # the same size, one byte changed after the upload
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(ArtifactError) as error:
        read_task_vector(store, "k")
    message = str(error.value)
    assert "\n" not in message and "checksum mismatch" in message
    assert message.startswith(f"{s3_uri}/{task_vector_prefix('k')}/delta.safetensors:")


def test_the_node_cache_downloads_an_object_once_and_only_a_verified_copy(
    s3_server: S3Server, s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGELINE_CACHE", str(tmp_path / "cache"))
    store = open_store(s3_uri, s3_server.endpoint, 30.0, block_size=5 * MiB)
    delta = {"w": torch.randn(1000)}
    write_task_vector(store, "k", delta, {"weight": torch.ones(2, 4)}, {"task": "t"})
    key = _key(s3_uri, f"{task_vector_prefix('k')}/delta.safetensors")
    client = s3_server.client()
    good = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    first = task_vector_file(store, "k")
    assert first.is_relative_to(tmp_path / "cache" / "objects")
    assert first.name == hashlib.sha256(good).hexdigest() and first.read_bytes() == good
    # the object changes in the store behind the manifest's back: the node's copy, checked
    # when it was made, is what a second reader gets; nothing is downloaded again
    client.put_object(Bucket=BUCKET, Key=key, Body=good[:-1] + bytes([good[-1] ^ 0xFF]))
    assert task_vector_file(store, "k") == first and first.read_bytes() == good

    # a node without the copy downloads the changed object, refuses it, and keeps nothing
    monkeypatch.setenv("MERGELINE_CACHE", str(tmp_path / "other-node"))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        task_vector_file(store, "k")
    assert [
        p for p in (tmp_path / "other-node").rglob("*") if p.is_file() and "lock" not in p.name
    ] == []


def test_a_local_store_file_is_read_in_place_and_rechecked_when_it_changes(
    tmp_path: Path,
) -> None:
    store = open_store(f"file://{tmp_path}/store")
    write_task_vector(store, "k", {"w": torch.randn(1000)}, {"weight": torch.ones(2)}, {})
    path = task_vector_file(store, "k")
    assert path == Path(store.local_path(f"{task_vector_prefix('k')}/delta.safetensors"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    before = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before + 10**9, before + 10**9))  # beyond a coarse clock's tick
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        task_vector_file(store, "k")

"""The ``files`` dataset source against a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipelines.stages.datasets import load_dataset
from storage.errors import DataError
from storage.files import read_bytes
from tests.conftest import REPO
from tests.conftest_s3 import BUCKET, S3Server
from tests.unit.test_files_data import EVAL, files_config

pytestmark = pytest.mark.integration


def upload(server: S3Server, path: Path, prefix: str) -> str:
    key = f"{prefix}/{path.name}"
    server.client().put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    return f"s3://{BUCKET}/{key}"


def test_the_same_bytes_on_s3_give_the_same_digest(s3_server: S3Server, tmp_path: Path) -> None:
    local = files_config(tmp_path, ".parquet")
    prefix = f"data-{uuid.uuid4().hex[:8]}"
    remote = local | {
        "train": upload(s3_server, Path(local["train"]), prefix),
        "test": upload(s3_server, Path(local["test"]), prefix),
        "endpoint_url": s3_server.endpoint,
    }
    from_disk = load_dataset(local, EVAL, "tasks[0].dataset")
    from_s3 = load_dataset(remote, EVAL, "tasks[0].dataset")
    assert from_s3.digest() == from_disk.digest()

    missing = f"s3://{BUCKET}/{prefix}/nope.parquet"
    with pytest.raises(DataError, match=f"{missing} does not exist"):
        load_dataset(remote | {"test": missing}, EVAL, "tasks[0].dataset")
    assert read_bytes(remote["train"], s3_server.endpoint) == Path(local["train"]).read_bytes()


def test_a_spec_on_s3_is_copied_by_the_rayjob_helper(s3_server: S3Server, tmp_path: Path) -> None:
    source = REPO / "examples" / "quickstart.yaml"
    uri = upload(s3_server, source, f"specs-{uuid.uuid4().hex[:8]}")
    target = tmp_path / "fetched" / "spec.yaml"
    command = [sys.executable, "-m", "storage.files", uri, str(target)]
    subprocess.run(command + ["--endpoint-url", s3_server.endpoint], check=True, cwd=REPO)
    assert target.read_bytes() == source.read_bytes()
    failed = subprocess.run(
        command[:3] + [uri + ".missing", str(target), "--endpoint-url", s3_server.endpoint],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "does not exist" in failed.stderr

"""S3 fixtures: a real S3 HTTP API (moto's threaded server) on 127.0.0.1, fake credentials.

Loaded as a plugin from ``tests/conftest.py``. The fake credentials are set for the whole
session, before any Ray starts, so that Ray workers inherit them like a user's shell would
pass them; no test can reach a real AWS account.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

FAKE_ACCESS_KEY = "AKIAMERGELINETEST0001"
#: Recognisable: a test greps every stored byte for it and must find none.
FAKE_SECRET_KEY = "mergeline-FAKE-secret-7Qz9xK2pW4vN8rT1"
BUCKET = "mergeline-test"


@pytest.fixture(scope="session", autouse=True)
def fake_aws_credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """AWS credentials from the environment only, as mergeline expects them."""
    nowhere = tmp_path_factory.mktemp("no-aws-config")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", str(nowhere / "config"))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere / "credentials"))
        yield


class S3Server:
    """moto's S3 API in a thread on 127.0.0.1; can be stopped and started on the same port.

    The first start binds port 0 (the kernel picks a free port, so parallel test sessions
    never race for one); a restart binds that same port again. The objects live in moto's
    in-process backend, so they survive a restart.
    """

    def __init__(self) -> None:
        self.port = 0
        self.running = False
        self._server = None

    @property
    def endpoint(self) -> str:
        assert self.port, "start the server first"
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve; returns once the port accepts connections."""
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server, self.running = server, True

    def stop(self) -> None:
        self._server.stop()
        self.running = False

    def client(self, service: str = "s3"):
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1")

    def set_iam_enforcement(self, enforce: bool) -> None:
        """Make the server check signatures and IAM policies (moto's reset-auth endpoint)."""
        import requests

        count = b"0" if enforce else b"inf"
        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=count, timeout=10)

    def keys(self, bucket: str = BUCKET) -> list[str]:
        """Every object key in ``bucket``."""
        paginator = self.client().get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in paginator.paginate(Bucket=bucket)
            for item in page.get("Contents", [])
        ]


@pytest.fixture(scope="session")
def s3_server(fake_aws_credentials: None) -> Iterator[S3Server]:
    """A running S3 API with the bucket :data:`BUCKET`."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = S3Server()
    server.start()
    server.client().create_bucket(Bucket=BUCKET)
    try:
        yield server
    finally:
        if server.running:
            server.stop()


@pytest.fixture
def s3_uri(s3_server: S3Server) -> str:
    """A fresh, empty store prefix in the bucket for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def grep_tree(root: Path, needle: bytes) -> list[str]:
    """The files under ``root`` whose bytes contain ``needle``."""
    return [str(path) for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]

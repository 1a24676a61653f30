"""Spec fields of storage, tracking and publish: validated once, credentials refused."""

from __future__ import annotations

import copy

import pytest

from pipelines.spec.load import validate_document
from storage.errors import SpecError
from tests.conftest import TINY_SPEC


def _with(**sections: dict) -> dict:
    document = copy.deepcopy(TINY_SPEC)
    document.update(sections)
    return document


def test_defaults_are_the_embedded_setup() -> None:
    spec = validate_document(_with())
    assert spec.storage.retry_seconds == 60.0 and spec.storage.endpoint_url is None
    assert spec.tracking.on_error == "fail" and spec.publish.min_improvement == 0.0


def test_s3_with_an_endpoint_and_options_validates() -> None:
    spec = validate_document(
        _with(
            storage={
                "uri": "s3://bucket/prefix",
                "endpoint_url": "http://127.0.0.1:9000",
                "retry_seconds": 5,
            },
            tracking={"uri": "http://127.0.0.1:5000", "on_error": "warn"},
            publish={"min_improvement": 0.01},
        )
    )
    assert spec.storage.uri == "s3://bucket/prefix" and spec.tracking.on_error == "warn"


@pytest.mark.parametrize(
    ("storage", "field"),
    [
        ({"uri": "s3://AKIAXX:topsecret@bucket/prefix"}, "storage.uri"),
        (
            {"uri": "s3://b/p", "endpoint_url": "http://key:topsecret@minio:9000"},
            "storage.endpoint_url",
        ),
    ],
)
def test_credentials_in_the_spec_are_refused_without_echoing_them(
    storage: dict, field: str
) -> None:
    with pytest.raises(SpecError, match="AWS_ACCESS_KEY_ID") as raised:
        validate_document(_with(storage=storage))
    assert field in str(raised.value) and "topsecret" not in str(raised.value)


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"storage": {"retry_seconds": 0}}, "storage.retry_seconds"),
        ({"storage": {"uri": "s3://b/p", "endpoint_url": "minio:9000"}}, "storage.endpoint_url"),
        ({"tracking": {"on_error": "ignore"}}, "tracking.on_error"),
        ({"publish": {"min_improvement": -0.1}}, "publish.min_improvement"),
        ({"publish": {"min_improvment": 0.1}}, "publish.min_improvment"),
    ],
)
def test_bad_values_name_their_field(sections: dict, field: str) -> None:
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        validate_document(_with(**sections))

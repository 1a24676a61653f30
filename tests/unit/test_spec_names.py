"""Every spec value that becomes a path component, an object key or an MLflow name passes
one rule (``storage.names.Name``) when the spec is loaded (issue 19, defect 2)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pipelines.spec.load import load_spec
from pipelines.spec.pipeline import json_schema
from storage.errors import ArtifactError, SpecError
from storage.names import NAME_SCHEMA_KEY
from storage.taskvectors import model_prefix
from tests.conftest import REPO
from workers.merge import get_method, list_methods

QUICKSTART = REPO / "examples" / "quickstart.yaml"

#: Every string field of the spec that is *not* a name, and what it is instead. A new string
#: field must be classified: give it the name rule (``storage.names.Name``) or list it here.
NOT_NAMES = {
    "FilesDataset.train": "a file location (URI or path), not a name",
    "FilesDataset.test": "a file location (URI or path), not a name",
    "FilesDataset.val": "a file location (URI or path), not a name",
    "FilesDataset.features_column": "a column of the user's file",
    "FilesDataset.text_column": "a column of the user's file",
    "FilesDataset.label_column": "a column of the user's file",
    "FilesDataset.prompt_column": "a column of the user's file",
    "FilesDataset.completion_column": "a column of the user's file",
    "FilesDataset.messages_column": "a column of the user's file",
    "FilesDataset.choices_column": "a column of the user's file",
    "FilesDataset.answer_column": "a column of the user's file",
    "FilesDataset.endpoint_url": "an S3 server URL",
    "FilesDataset.encoding": "a text codec name, checked against Python's codecs",
    "HubDataset.path": "a Hugging Face dataset id (may hold '/')",
    "HubDataset.name": "a Hugging Face dataset configuration",
    "HubDataset.revision": "a Hugging Face revision",
    "HubDataset.data_files": "file locations",
    "HubDataset.train_split": "a split of the user's dataset",
    "HubDataset.test_split": "a split of the user's dataset",
    "HubDataset.val_split": "a split of the user's dataset",
    "HubDataset.features_column": "a column of the user's dataset",
    "HubDataset.text_column": "a column of the user's dataset",
    "HubDataset.label_column": "a column of the user's dataset",
    "HubDataset.prompt_column": "a column of the user's dataset",
    "HubDataset.completion_column": "a column of the user's dataset",
    "HubDataset.messages_column": "a column of the user's dataset",
    "HubDataset.choices_column": "a column of the user's dataset",
    "HubDataset.answer_column": "a column of the user's dataset",
    "AdapterSpec.target_modules": "module names of the model (PEFT matches them as suffixes)",
    "HFModel.model": "a model location or Hugging Face id (may hold '/')",
    "HFModel.revision": "a Hugging Face revision",
    "HFModel.endpoint_url": "an S3 server URL",
    "StorageSpec.uri": "the store's own URI",
    "StorageSpec.endpoint_url": "an S3 server URL",
    "TrackingSpec.uri": "the tracking server's URI",
    "ComputeSpec.ray_address": "a Ray address",
}


def _string_fields(
    schema: dict[str, Any], root: str = "Spec"
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(owner.field, --set path, node) of every free string in the schema (enums excluded)."""
    definitions = schema.get("$defs", {})

    def walk(node: dict[str, Any], owner: str, path: str, seen: frozenset[str]):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                yield from walk(definitions[name], name, path, seen | {name})
            return
        for key in ("anyOf", "oneOf", "allOf"):
            for option in node.get(key, []):
                yield from walk(option, owner, path, seen)
        for field, child in node.get("properties", {}).items():
            yield from walk(child, f"{owner}.{field}", f"{path}.{field}".lstrip("."), seen)
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], owner, f"{path}.0", seen)
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], owner, f"{path}.KEY", seen)
        if node.get("type") == "string" and "enum" not in node and "const" not in node:
            yield owner, path, node

    yield from walk(schema, root, "", frozenset({root}))


def _method_schemas() -> dict[str, dict[str, Any]]:
    """Each registered merge method's params schema: the spec's candidates' params."""
    return {name: get_method(name).params_model.model_json_schema() for name in list_methods()}


def _name_fields() -> list[tuple[str, str]]:
    found = {
        (owner, path)
        for owner, path, node in _string_fields(json_schema())
        if node.get(NAME_SCHEMA_KEY)
    }
    return sorted(found)


def test_every_string_field_is_a_name_under_the_rule_or_listed_as_not_a_name() -> None:
    fields = list(_string_fields(json_schema()))
    for method, schema in _method_schemas().items():
        fields += _string_fields(schema, method)
    unclassified = {
        owner
        for owner, _, node in fields
        if not node.get(NAME_SCHEMA_KEY) and owner not in NOT_NAMES
    }
    assert not unclassified, (
        f"string fields {sorted(unclassified)} carry no name rule: annotate them with "
        "storage.names.Name if they reach a path, a store key or an MLflow name, else list "
        "them in NOT_NAMES"
    )
    ruled = {owner for owner, _, node in fields if node.get(NAME_SCHEMA_KEY)}
    assert not ruled & set(NOT_NAMES), "a field cannot be both a name and not a name"
    assert "tall_masks.task" in ruled  # a method param that names a task


def test_the_known_names_carry_the_rule() -> None:
    ruled = {owner for owner, _ in _name_fields()}
    expected = {
        "Spec.name",
        "TaskSpec.name",
        "CandidateSpec.method",
        "NegateSpec.target",
        "NegateSpec.control",
        "TrackingSpec.experiment",
        "TrackingSpec.registered_model",
    }
    assert expected <= ruled


@pytest.mark.parametrize("bad", ["../../../../x", "team/digits", "a:b", "..", "", "-x", "x" * 65])
@pytest.mark.parametrize("path", [path for _, path in _name_fields()])
def test_every_name_field_refuses_unsafe_values_at_load_time(path: str, bad: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(QUICKSTART, [f"{path}={bad}"])
    shown = path.replace(".0.", "[0].").replace(".0", "[0]")
    assert f"field '{shown}'" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("good", ["digits", "digits-v2", "team_a.digits", "A1", "x" * 64])
def test_ordinary_names_pass(good: str) -> None:
    spec = load_spec(
        QUICKSTART, [f"tracking.registered_model={good}", f"tracking.experiment={good}"]
    )
    assert spec.registered_model == good


def test_the_registered_model_cannot_escape_the_store() -> None:
    with pytest.raises(SpecError, match="tracking.registered_model"):
        load_spec(QUICKSTART, ["tracking.registered_model=../../../../x"])
    with pytest.raises(SpecError, match="tracking.registered_model"):
        load_spec(QUICKSTART, ["tracking.registered_model=team/digits"])


def test_the_store_key_builder_refuses_an_unsafe_model_name_too() -> None:
    assert model_prefix("digits", "20260101-000000-abc") == "models/digits/20260101-000000-abc"
    with pytest.raises(ArtifactError):
        model_prefix("../../x", "20260101-000000-abc")

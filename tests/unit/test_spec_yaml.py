"""How spec files and ``--set`` values are read as YAML (issue 19, defects 9 and 10)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.commands.merge import parse_coefficient
from pipelines.spec.load import load_spec, parse_override, read_document
from pipelines.spec.pipeline import json_schema
from storage.errors import SpecError
from tests.conftest import REPO

QUICKSTART = REPO / "examples" / "quickstart.yaml"


def _enum_fields(schema: dict[str, Any]) -> Iterator[tuple[str, list[Any]]]:
    """(dotted path, documented values) of every enum (``Literal``) field of the spec."""
    definitions = schema.get("$defs", {})

    def walk(node: dict[str, Any], path: str, seen: frozenset[str]):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                yield from walk(definitions[name], path, seen | {name})
            return
        for key in ("anyOf", "oneOf", "allOf"):
            for option in node.get(key, []):
                yield from walk(option, path, seen)
        for field, child in node.get("properties", {}).items():
            yield from walk(child, f"{path}.{field}".lstrip("."), seen)
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}.0", seen)
        if "enum" in node:
            yield path, node["enum"]
        elif "const" in node:
            yield path, [node["const"]]

    yield from walk(schema, "", frozenset())


ENUM_VALUES = sorted(
    {(path, value) for path, values in _enum_fields(json_schema()) for value in values},
    key=str,
)


def test_the_schema_walk_finds_the_enums() -> None:
    found = {(path, value) for path, value in ENUM_VALUES}
    assert ("merge.fast_path", "off") in found
    assert ("tracking.on_error", "warn") in found
    assert ("tasks.0.dataset.format", "auto") in found  # inside a discriminated union
    assert ("finetune.deepspeed.zero_stage", 0) in found


def _nested(path: str, value: str) -> str:
    """``a.0.b`` = value written as block YAML, the value unquoted."""
    text, indent = "", ""
    for part in path.split("."):
        if part.isdigit():
            text += f"{indent}-\n"
        else:
            text += f"{indent}{part}:\n"
        indent += "  "
    return text.rstrip("\n") + f" {value}\n"


def _leaf(document: Any, path: str) -> Any:
    for part in path.split("."):
        document = document[int(part)] if part.isdigit() else document[part]
    return document


@pytest.mark.parametrize(("path", "value"), ENUM_VALUES, ids=[f"{p}={v}" for p, v in ENUM_VALUES])
def test_every_documented_enum_value_reads_unquoted(path: str, value: Any, tmp_path: Path) -> None:
    file = tmp_path / "spec.yaml"
    file.write_text(_nested(path, str(value)))
    from_file = _leaf(read_document(file), path)
    _, from_set = parse_override(f"{path}={value}")
    for read in (from_file, from_set):
        assert read == value and type(read) is type(value), (path, value, read)


@pytest.mark.parametrize("how", ["file", "set"])
def test_readme_fast_path_off_works_unquoted(how: str, tmp_path: Path) -> None:
    if how == "file":
        text = QUICKSTART.read_text() + "\n"
        text = text.replace("merge:\n", "merge:\n  fast_path: off\n", 1)
        assert "fast_path: off" in text
        path = tmp_path / "spec.yaml"
        path.write_text(text)
        spec = load_spec(path)
    else:
        spec = load_spec(QUICKSTART, ["merge.fast_path=off"])
    assert spec.merge.fast_path == "off"


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "Yes", "NO", "On", "OFF", "y", "n"])
def test_yaml_1_1_booleans_stay_strings_where_a_string_is_meant(word: str) -> None:
    spec = load_spec(QUICKSTART, [f"tasks.0.name={word}", f"tracking.experiment={word}"])
    assert spec.tasks[0].name == word and spec.tracking.experiment == word


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("on", True)])
def test_a_boolean_field_still_takes_booleans(text: str, expected: bool) -> None:
    spec = load_spec(QUICKSTART, [f"merge.search.per_task={text}"])
    assert spec.merge.search.per_task is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("False", False),
        ("null", None),
        ("~", None),
        ("010", 10),  # YAML 1.2: decimal, not octal
        ("0o10", 8),
        ("0x1f", 31),
        ("-0x1f", -31),
        ("1e-3", 0.001),
        ("2.5", 2.5),
        ("1:30", "1:30"),  # YAML 1.1 read this as the sexagesimal 90
        ("2026-01-01", "2026-01-01"),  # and this as a date
        ("off", "off"),
    ],
)
def test_scalars_follow_yaml_1_2(raw: str, expected: Any) -> None:
    assert parse_override(f"a={raw}")[1] == expected
    assert type(parse_override(f"a={raw}")[1]) is type(expected)


# ----------------------------------------------------------------------------- defect 10
def test_a_duplicate_key_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: dup\nfinetune:\n  steps: 300\n  lr: 0.01\n  steps: 2\n")
    with pytest.raises(SpecError) as caught:
        read_document(path)
    message = str(caught.value)
    assert "'steps'" in message and "lines 3 and 5" in message, message
    assert "\n" not in message


def test_a_duplicate_top_level_section_is_refused(tmp_path: Path) -> None:
    text = QUICKSTART.read_text() + "\nfinetune: {steps: 2}\n"
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"'finetune'.*lines \d+ and \d+"):
        load_spec(path)


def test_a_duplicate_key_in_a_flow_mapping_and_in_set_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("tasks:\n  - {name: a, name: b}\n")
    with pytest.raises(SpecError, match="'name'.*lines 2 and 2"):
        read_document(path)
    with pytest.raises(SpecError, match="'steps'"):
        parse_override("finetune={steps: 3, steps: 4}")


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("base: &b {steps: 3, lr: 0.1}\nfinetune:\n  <<: *b\n  steps: 5\n")
    assert read_document(path)["finetune"] == {"steps": 5, "lr": 0.1}


def test_merge_coefficients_read_task_names_as_written() -> None:
    assert parse_coefficient("{no: 0.3, on: 0.7}") == {"no": 0.3, "on": 0.7}

"""Spec loading, overrides and validation errors (pure, no services)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from pipelines.spec.base_model import HFModel
from pipelines.spec.load import apply_overrides, load_spec, parse_override, validate_document
from pipelines.spec.merge import CoefficientGrid
from pipelines.spec.pipeline import json_schema
from pipelines.spec.tasks import FilesDataset
from storage.errors import SpecError
from tests.conftest import REPO, TINY_SPEC


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.tasks


def test_default_coefficient_grid_is_21_points_step_005() -> None:
    points = CoefficientGrid().points()
    assert len(points) == 21
    assert points[0] == 0.0 and points[-1] == 1.0
    assert points[1] == pytest.approx(0.05)
    assert CoefficientGrid(values=[0.3, 0.7]).points() == [0.3, 0.7]


def test_overrides_parse_yaml_values_and_reach_nested_lists() -> None:
    assert parse_override("finetune.steps=5") == (["finetune", "steps"], 5)
    assert parse_override("base_model.hidden=[4, 8]") == (["base_model", "hidden"], [4, 8])
    document = apply_overrides(
        TINY_SPEC, ["tasks.1.name=other", "finetune.lr=1e-2", "compute.ray_address=auto"]
    )
    assert document["tasks"][1]["name"] == "other"
    assert document["finetune"]["lr"] == pytest.approx(0.01)
    assert document["compute"]["ray_address"] == "auto"
    assert TINY_SPEC["tasks"][1]["name"] == "perm2"  # the input is not modified


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["finetune.steps=-1"], "finetune.steps"),
        (["finetune.batch_size=0"], "finetune.batch_size"),
        (["finetune.mode=sideways"], "finetune.mode"),
        (["finetune.unknown=1"], "finetune.unknown"),
        (["evaluation.val_fraction=1.5"], "evaluation.val_fraction"),
        (["tasks.1.name=perm1"], "used twice"),
        (["tasks.0.name=../up"], "not safe as a path component"),
        (["tasks.0.name=a/b"], "not safe as a path component"),
        (["tasks.0.name="], "tasks[0].name"),
        (["tasks.0.dataset.source=ftp"], "tasks[0].dataset"),
        (["storage.uri=gs://bucket"], "storage.uri"),
        (["merge.candidates.0.method=nope"], "unknown merge method"),
        (["merge.candidates.0.coefficient.values=[]"], "coefficient.values"),
        (["merge.candidates.0.coefficient.values=[.nan]"], "finite"),
        (["finetune.mode=linear", "finetune.deepspeed.zero_stage=3"], "ZeRO stage 3"),
    ],
)
def test_bad_specs_name_the_field(overrides: list[str], fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        validate_document(apply_overrides(TINY_SPEC, overrides))
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_method_params_are_validated_per_value_of_a_grid() -> None:
    document = apply_overrides(
        TINY_SPEC,
        ["merge.candidates.0.method=ties", "merge.candidates.0.params.density=[0.1, 1.5]"],
    )
    with pytest.raises(SpecError, match=r"merge.candidates\[0\].params"):
        validate_document(document)
    ok = apply_overrides(
        TINY_SPEC,
        ["merge.candidates.0.method=ties", "merge.candidates.0.params.density=[0.1, 0.2]"],
    )
    assert validate_document(ok).merge.candidates[0].params == {"density": [0.1, 0.2]}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("name: [unclosed", "YAML"), ("", "empty"), ("- a\n- b\n", "mapping")],
)
def test_bad_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=fragment):
        load_spec(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_schema_is_generated_and_forbids_extras() -> None:
    schema = json_schema()
    assert {"tasks", "finetune", "merge", "storage", "tracking"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    json.dumps(schema)


def test_set_on_the_file_is_applied_before_validation(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(TINY_SPEC))
    assert load_spec(path, ["finetune.steps=7"]).finetune.steps == 7
    with pytest.raises(SpecError):
        load_spec(path, ["finetune.steps=0"])


def test_the_spec_models_look_at_no_file_and_the_loader_locates_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert HFModel(model="model").model == "model"  # a directory here, but not looked at
    assert FilesDataset(train="a.csv", test="s3://b/t.csv").train == "a.csv"
    document = copy.deepcopy(TINY_SPEC)
    document["base_model"] = {"source": "hf", "model": "model"}
    files = {"source": "files", "train": "a.csv", "test": "s3://b/t.csv", "text_column": "x"}
    document["tasks"] = [{"name": name, "dataset": dict(files)} for name in ("t1", "t2")]
    given = copy.deepcopy(document)
    spec = validate_document(document)
    assert spec.base_model.model == str(tmp_path / "model")
    assert spec.tasks[0].dataset.train == str(tmp_path / "a.csv")
    assert spec.tasks[0].dataset.test == "s3://b/t.csv"
    assert document == given  # the caller's document is left as it was

"""The fine-tune's precision, memory and schedule settings in the spec: validation, schema, the
task-vector key (unchanged at the defaults) and the TrainConfig a fine-tune job builds."""

from __future__ import annotations

from typing import Any

import pytest

from pipelines.spec.finetune import KEY_NEUTRAL_DEFAULTS, FinetuneSpec
from pipelines.spec.load import validate_document
from pipelines.spec.pipeline import json_schema
from pipelines.spec.plan import make_plan, task_vector_key
from pipelines.stages.training import train_config
from storage.errors import SpecError
from workers.finetune import TrainConfig

KEY_SPEC = {
    "name": "keys",
    "base_model": {"source": "builtin", "name": "mlp", "seed": 0},
    "tasks": [{"name": "a", "dataset": {"source": "sklearn", "name": "digits", "classes": [0, 1]}}],
    "finetune": {"steps": 10, "batch_size": 8, "lr": 1e-3},
}
#: task_vector_key("b" * 64, "d" * 64, ...) of KEY_SPEC, computed by the code before these
#: settings existed: stored task vectors of default specs must stay cache hits.
KEY_BEFORE_THESE_SETTINGS = "194061cf1b63f44f521e184f41ad9252"
NEW = {
    "precision": "bf16",
    "gradient_checkpointing": True,
    "grad_accumulation": 2,
    "lr_schedule": "cosine",
    "warmup_steps": 3,
    "max_grad_norm": 1.0,
}


def _document(finetune: dict[str, Any], hf: bool = False) -> dict[str, Any]:
    spec = dict(KEY_SPEC, finetune=KEY_SPEC["finetune"] | finetune)
    if hf:  # gradient checkpointing needs a Hugging Face model
        spec["base_model"] = {"source": "hf", "model": "some/model"}
        dataset = {"source": "files", "train": "a.csv", "test": "b.csv", "text_column": "text"}
        spec["tasks"] = [{"name": "a", "dataset": dataset}]
    return spec


def _key(finetune: dict[str, Any], hf: bool = False) -> str:
    plan = make_plan(validate_document(_document(finetune, hf)))
    return task_vector_key("b" * 64, "d" * 64, plan.finetune)


def test_a_spec_without_the_new_settings_keeps_its_task_vector_key() -> None:
    assert _key({}) == KEY_BEFORE_THESE_SETTINGS
    explicit = {name: KEY_NEUTRAL_DEFAULTS[name] for name in NEW}
    assert _key(explicit) == KEY_BEFORE_THESE_SETTINGS


@pytest.mark.parametrize("name", sorted(NEW))
def test_each_setting_away_from_its_default_changes_the_key(name: str) -> None:
    if name == "gradient_checkpointing":  # needs an hf base, which changes the key by itself
        assert _key({name: True}, hf=True) != _key({name: False}, hf=True)
    else:
        assert _key({name: NEW[name]}) != KEY_BEFORE_THESE_SETTINGS


def test_the_defaults_are_the_settings_that_train_as_before() -> None:
    spec = FinetuneSpec()
    for name, value in KEY_NEUTRAL_DEFAULTS.items():
        assert getattr(spec, name) == value, name
    defaults = TrainConfig(steps=1, batch_size=1, lr=1.0)
    for name in NEW:
        assert getattr(defaults, name) == KEY_NEUTRAL_DEFAULTS[name], name


def test_a_fine_tune_job_gets_every_setting_of_the_spec() -> None:
    plan = make_plan(validate_document(_document(NEW, hf=True)))
    config = train_config(plan.finetune)
    assert (config.steps, config.batch_size, config.lr) == (10, 8, 1e-3)
    for name, value in NEW.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize(
    ("finetune", "fragment"),
    [
        ({"precision": "fp8"}, "precision"),
        ({"grad_accumulation": 0}, "grad_accumulation"),
        ({"grad_accumulation": 3}, "split evenly into"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"warmup_steps": 10}, "warmup_steps 10 must be fewer than steps 10"),
        ({"max_grad_norm": 0}, "max_grad_norm"),
        ({"gradient_checkpointing": True}, "needs a Hugging Face model"),
        (
            {"precision": "bf16", "deepspeed": {"zero_stage": 0}},
            "needs deepspeed.zero_stage 1 or 2",
        ),
    ],
)
def test_bad_settings_are_refused_in_one_line(finetune: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        validate_document(_document(finetune))


def test_gradient_checkpointing_is_refused_in_linear_mode() -> None:
    with pytest.raises(ValueError, match="does not apply in linear mode"):
        FinetuneSpec(mode="linear", gradient_checkpointing=True)


def test_the_schema_documents_every_setting() -> None:
    fields = json_schema()["$defs"]["FinetuneSpec"]["properties"]
    for name in NEW:
        assert fields[name]["description"], name
    assert fields["precision"]["enum"] == ["fp32", "bf16", "fp16"]
    assert fields["lr_schedule"]["enum"] == ["constant", "linear", "cosine"]

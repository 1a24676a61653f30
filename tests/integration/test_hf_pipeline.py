"""The ``hf`` model source through the whole pipeline, on a real local Ray and MLflow.

A tiny randomly initialised BERT (saved as a local model directory with the real MiniLM
tokenizer) is fine-tuned on two short-text tasks; the published merge is loaded back with
``transformers.AutoModel.from_pretrained`` plus the heads beside it, and through the MLflow
model, and both must reproduce the accuracy the pipeline reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from pipelines.stages.datasets import load_dataset
from tests.hf_fixtures import write_text_task, write_tiny_bert

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]
transformers = pytest.importorskip("transformers")
EVALUATION = {"val_fraction": 0.1, "val_max": 5000, "split_seed": 0}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def _spec(tmp_path: Path, model: str, mode: str = "standard") -> dict:
    return {
        "name": f"text-{mode}",
        "base_model": {"source": "hf", "model": model, "max_length": 16},
        "tasks": [
            {"name": f"words{i}", "dataset": write_text_task(tmp_path / f"words{i}", i)}
            for i in (1, 2)
        ],
        "finetune": {"mode": mode, "steps": 20, "batch_size": 16, "lr": 1e-3},
        "merge": {
            "candidates": [
                {"method": "task_arithmetic", "coefficient": {"start": 0, "stop": 1, "num": 5}}
            ]
        },
        "storage": {"uri": f"file://{tmp_path}/store"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "text"},
    }


def _run(document: dict, tmp_path: Path) -> dict:
    devnull = Console(file=open("/dev/null", "w"))
    return run_pipeline(validate_document(document), devnull, tmp_path / "summary.json")


def _texts(dataset: dict) -> tuple[list[str], np.ndarray]:
    data = load_dataset(dataset, EVALUATION, "test")
    return [str(t) for t in data.x_test], data.y_test


def _pooled(encoder, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def test_the_merged_encoder_loads_with_transformers_and_reproduces_the_pipeline(
    tiny_bert: Path, tmp_path: Path
) -> None:
    import mlflow

    document = _spec(tmp_path, str(tiny_bert))
    summary = _run(document, tmp_path)
    assert summary["status"] == "succeeded" and set(summary["tasks"]) == {"words1", "words2"}
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))

    # The export: a directory transformers loads as it is, and the heads beside it.
    exported = model_dir / "transformers"
    encoder = transformers.AutoModel.from_pretrained(str(exported), local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    heads = load_file(str(model_dir / "heads.safetensors"))
    info = json.loads((model_dir / "heads.json").read_text())
    assert info["transformers_weights"] is True and info["pooling"] == "mean"
    assert set(info["tasks"]) == {"words1", "words2"}

    # Its weights are θ0 + Σ λ_t τ_t: not the base's, and equal to the pipeline's merged model.
    base = transformers.AutoModel.from_pretrained(str(tiny_bert), local_files_only=True)
    merged_state = load_file(str(model_dir / "model.safetensors"))
    name = "embeddings.word_embeddings.weight"
    assert not torch.equal(encoder.state_dict()[name], base.state_dict()[name])
    assert torch.equal(encoder.state_dict()[name], merged_state[f"encoder.{name}"])

    mlflow.set_tracking_uri(document["tracking"]["uri"])
    served = mlflow.pyfunc.load_model(f"models:/text-standard/{summary['model']['version']}")
    for index, task in enumerate(("words1", "words2")):
        texts, labels = _texts(document["tasks"][index]["dataset"])
        features = _pooled(encoder, tokenizer, texts, info["max_length"])
        logits = features @ heads[f"{task}.weight"].T + heads[f"{task}.bias"]
        predicted = logits.argmax(1).numpy()
        reported = summary["best"]["test"]["per_task"][task]
        assert float((predicted == labels).mean()) == pytest.approx(reported, abs=1e-9)
        # The MLflow model takes a text column and gives the same predictions.
        frame = pd.DataFrame({"text": texts})
        assert np.array_equal(served.predict(frame, params={"task": task}), predicted)


def test_linear_mode_on_a_hugging_face_encoder_serves_the_linearized_model(
    tiny_bert: Path, tmp_path: Path
) -> None:
    import mlflow

    document = _spec(tmp_path, str(tiny_bert), mode="linear")
    summary = _run(document, tmp_path)
    assert summary["mode"] == "linear" and summary["search"]["fast_path"] is True
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    config = json.loads((model_dir / "transformers" / "config.json").read_text())
    assert config["model_type"] == "bert"
    # The linearized model is no plain transformers model: config + tokenizer, no weights.
    assert not (model_dir / "transformers" / "model.safetensors").exists()
    assert json.loads((model_dir / "heads.json").read_text())["transformers_weights"] is False

    mlflow.set_tracking_uri(document["tracking"]["uri"])
    served = mlflow.pyfunc.load_model(f"models:/text-linear/{summary['model']['version']}")
    for index, task in enumerate(("words1", "words2")):
        texts, labels = _texts(document["tasks"][index]["dataset"])
        predicted = served.predict(pd.DataFrame({"text": texts}), params={"task": task})
        reported = summary["best"]["test"]["per_task"][task]
        assert float((predicted == labels).mean()) == pytest.approx(reported, abs=1e-9)

    # The disentanglement diagnostic runs on the same (cached) text task vectors.
    from pipelines.commands.diagnose import compute_disentanglement

    spec = validate_document(document)
    errors = compute_disentanglement(
        spec, ("words1", "words2"), [0.0, 1.0], "val", Console(file=open("/dev/null", "w"))
    )
    assert errors[0][0] == 0.0 and all(0.0 <= v <= 2.0 for row in errors for v in row)


def test_a_model_directory_on_s3_is_the_same_base_as_its_local_copy(
    tiny_bert: Path, tmp_path: Path, s3_server, s3_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An s3:// model prefix is copied once into the cache; its digest is its content's."""
    from pipelines.stages.base import open_base, pretrain_base_job
    from pipelines.stages.jobs import PretrainJob
    from pipelines.stages.model_dirs import resolve_model_dir
    from storage.objectstore import open_store
    from workers.models.huggingface import directory_digest

    monkeypatch.setenv("MERGELINE_CACHE", str(tmp_path / "cache"))
    remote = open_store(f"{s3_uri}/tiny-bert", s3_server.endpoint)
    for path in tiny_bert.iterdir():
        remote.put(path.name, path.read_bytes())
    fetched = resolve_model_dir(f"{s3_uri}/tiny-bert", endpoint_url=s3_server.endpoint)
    assert fetched.is_relative_to(tmp_path / "cache")
    assert directory_digest(fetched) == directory_digest(tiny_bert)

    config = validate_document(_spec(tmp_path, f"{s3_uri}/tiny-bert")).base_model.model_dump()
    config["endpoint_url"] = s3_server.endpoint
    store_cfg = {"uri": f"file://{tmp_path}/store"}
    ref, _ = pretrain_base_job(PretrainJob(store_cfg, "s3base", config, EVALUATION, 0))
    base = open_base(store_cfg, "s3base", ref.meta)
    local = transformers.AutoModel.from_pretrained(str(tiny_bert), local_files_only=True)
    for name, tensor in local.state_dict().items():
        assert torch.equal(base.theta0[f"encoder.{name}"], tensor)
    assert base.tokenizer("hello world")["input_ids"][0] == 101  # [CLS] of the real vocabulary

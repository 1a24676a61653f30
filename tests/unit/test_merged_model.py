"""The served model without MLflow: :class:`workers.models.merged.MergedPredictor` reads a
local merged-model directory (paths in, labels out), the pure part of ``storage.serving``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.tall import tall_files
from storage.tensors import tensors_to_bytes
from tests.conftest import REPO
from workers.merge.compression import compress_tall, retrieve_task
from workers.models import apply_head, build_backbone
from workers.models.merged import MergedPredictor

MODEL = {"source": "builtin", "name": "mlp", "hidden": [8], "features": 6, "seed": 0}


def _write_model(directory: Path, tall: bool) -> tuple[dict, dict, dict]:
    """A builtin merged model in ``directory``; (θ0, heads, task states) it should serve."""
    generator = torch.Generator().manual_seed(3)
    base = {k: v.clone() for k, v in build_backbone(MODEL, 4).state_dict().items()}
    heads = {
        task: {"weight": torch.randn(3, 6, generator=generator), "bias": torch.zeros(3)}
        for task in ("a", "b")
    }
    tensors = dict(base)
    for task, head in heads.items():
        tensors |= {f"heads.{task}.{name}": value for name, value in head.items()}
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(tensors_to_bytes(tensors))
    config = {"base_model": MODEL, "input_dim": 4}
    (directory / "config.json").write_text(json.dumps(config))
    states = {task: base for task in heads}
    if tall:
        vectors = {
            task: {k: 0.5 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
            for task in heads
        }
        compressed = compress_tall(base, vectors, 0.4)
        for name, content in tall_files(compressed.multi_task, compressed.masks).items():
            content.save(directory / name)
        states = {t: retrieve_task(base, compressed.multi_task, compressed.masks[t]) for t in heads}
    return base, heads, states


@pytest.mark.parametrize("tall", [False, True])
def test_the_predictor_serves_each_tasks_head_and_tall_masks_state(
    tmp_path: Path, tall: bool
) -> None:
    _, heads, states = _write_model(tmp_path / "model", tall)
    served = MergedPredictor(tmp_path / "model")
    assert served.tasks == ["a", "b"] and bool(served.task_states) == tall
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    backbone = build_backbone(MODEL, 4)
    for task in ("a", "b"):
        features = torch.func.functional_call(backbone, states[task], (torch.from_numpy(x),))
        expected = apply_head(heads[task], features).argmax(dim=1).numpy()
        assert np.array_equal(served.predict(x, task), expected)
    assert np.array_equal(served.predict(x), served.predict(x, "a"))  # the first task
    if tall:  # each task gets its own backbone θ0 + m_t ∘ τ_MTL
        assert any(not torch.equal(states["a"][k], states["b"][k]) for k in states["a"])
    with pytest.raises(ValueError, match=r"unknown task 'c'; this model serves \['a', 'b'\]"):
        served.predict(x, "c")


def test_the_merged_model_worker_imports_no_mlflow_and_no_object_store() -> None:
    code = (
        "import sys, workers.models.merged; "
        "print(sorted(m for m in ('mlflow', 'fsspec', 'storage.objectstore') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"

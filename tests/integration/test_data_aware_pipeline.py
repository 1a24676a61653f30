"""RegMean and Fisher merging through the whole pipeline (real local Ray and MLflow).

The statistics they read are computed after fine-tuning, stored beside each task vector (tied
to its sha256), reused by a rerun, and the published model is the method's merge of exactly
those statistics. With LoRA task vectors they cover the adapted weights only.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from storage.shards import SafetensorsReader
from tests.conftest import TINY_SPEC
from workers.merge import merge

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]

CANDIDATES = [
    {
        "method": "regmean",
        "params": {"n": 64, "alpha": [0.5, 0.9]},
        "coefficient": {"values": [1.0]},
    },
    {"method": "fisher", "params": {"n": 32}, "coefficient": {"values": [0.8, 1.0]}},
]


def _run(document: dict, tmp_path: Path, name: str) -> tuple[dict, str]:
    out = io.StringIO()
    summary = run_pipeline(
        validate_document(document), Console(file=out, width=200), tmp_path / name
    )
    return summary, out.getvalue()


def _vector_dir(task: dict) -> Path:
    return Path(task["task_vector_uri"].removeprefix("file://"))


def test_regmean_and_fisher_compute_store_and_reuse_their_statistics(tmp_path: Path) -> None:
    spec = copy.deepcopy(TINY_SPEC)
    spec["storage"] = {"uri": f"file://{tmp_path}/store"}
    spec["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "data-aware"}
    spec["merge"] = {"candidates": CANDIDATES}
    first, printed = _run(spec, tmp_path, "first.json")
    assert "statistics fisher (n=32), gram (n=64): 2 computed, 0 cached" in printed
    assert first["search"]["candidates_evaluated"] == 4
    assert first["best"]["method"] in {"regmean", "fisher"}

    stats = {}
    for name, task in first["tasks"].items():
        folder = _vector_dir(task) / "statistics"
        assert sorted(p.name for p in folder.iterdir()) == ["fisher-n32", "gram-n64"]
        for kind in ("fisher-n32", "gram-n64"):
            meta = json.loads((folder / kind / "manifest.json").read_text())["meta"]
            assert meta["task_vector_sha256"] == task["sha256"]
            assert meta["rows_used"] == int(kind.split("-n")[1])
        stats[name] = {
            k: load_file(folder / k / "statistics.safetensors") for k in ("fisher-n32", "gram-n64")
        }
        grams = stats[name]["gram-n64"]
        # the MLP's two linear layers, (in × in), symmetric positive semi-definite
        assert sorted(grams) == ["layers.0.weight", "layers.1.weight"]
        for gram in grams.values():
            assert gram.shape[0] == gram.shape[1] and bool((gram - gram.T).abs().max() < 1e-5)
        fisher = stats[name]["fisher-n32"]
        assert set(fisher) == set(load_file(_vector_dir(task) / "delta.safetensors"))
        assert all(bool((f >= 0).all()) for f in fisher.values())

    # the published model is the chosen method's merge of θ0, τ_t and these statistics
    best = first["best"]
    label = "gram-n64" if best["method"] == "regmean" else "fisher-n32"
    store = tmp_path / "store"
    base_dir = next((store / "base-models").iterdir())
    theta0 = load_file(base_dir / "model.safetensors")
    vectors = {
        n: load_file(_vector_dir(t) / "delta.safetensors") for n, t in first["tasks"].items()
    }
    params = {k: v for k, v in best["params"].items()}
    coefficient = best["coefficients"]
    coefficient = (
        coefficient if isinstance(coefficient, float) else next(iter(coefficient.values()))
    )
    expected = merge(
        best["method"],
        theta0,
        vectors,
        coefficient,
        **params,
        statistics={n: stats[n][label] for n in vectors},
    )
    published = load_file(Path(first["model"]["uri"].removeprefix("file://")) / "model.safetensors")
    for name, tensor in expected.items():
        assert bool((published[name] - tensor).abs().max() < 1e-6), name

    # `mergeline merge` reads the same stored statistics (and refuses when there are none)
    base_key = base_dir.name
    command = [sys.executable, "-m", "pipelines.cli", "merge", "--base", f"base-models/{base_key}"]
    command += ["--task", "perm1", "--task", "perm2", "--store", f"file://{store}"]
    done = subprocess.run(
        [*command, "--method", "regmean", "--param", "n=64", "--param", "alpha=0.5",
         "--coefficient", "0.9", "--out", str(tmp_path / "cli")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    expected = merge(
        "regmean", theta0, vectors, 0.9, alpha=0.5,
        statistics={n: stats[n]["gram-n64"] for n in vectors},
    )  # fmt: skip
    with SafetensorsReader(tmp_path / "cli") as reader:
        merged = {name: reader.read(name) for name in reader.names()}
    for name, tensor in expected.items():
        assert bool((merged[name] - tensor).abs().max() < 1e-6), name
    for method, params, coefficient in [("tsv", {"fraction": 0.5}, 1.2), ("slerp", {}, 0.3)]:
        out = tmp_path / method
        flags = [flag for k, v in params.items() for flag in ("--param", f"{k}={v}")]
        done = subprocess.run(
            [*command, "--method", method, *flags, "--coefficient", str(coefficient),
             "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        expected = merge(method, theta0, vectors, coefficient, **params)
        with SafetensorsReader(out) as reader:
            for name, tensor in expected.items():
                assert torch.equal(reader.read(name), tensor), (method, name)
    done = subprocess.run(
        [*command, "--method", "fisher", "--param", "n=999", "--out", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "has no fisher statistics over 999 rows" in done.stderr

    again, printed = _run(spec, tmp_path, "again.json")
    assert "2 computed" not in printed and "0 computed, 2 cached" in printed
    assert again["best"] == first["best"]


def test_lora_task_vectors_get_statistics_of_their_adapted_weights(tmp_path: Path) -> None:
    from tests.integration.test_causal_lm_pipeline import _spec
    from tests.lm_fixtures import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny-llama")
    spec = _spec(tmp_path, model, "standard")
    spec["finetune"]["adapter"] = {"kind": "lora", "r": 4, "alpha": 8}
    spec["merge"] = {
        "candidates": [
            {"method": "regmean", "params": {"n": 16}, "coefficient": {"values": [1.0]}},
            {"method": "fisher", "params": {"n": 8}, "coefficient": {"values": [1.0]}},
        ]
    }
    summary, printed = _run(spec, tmp_path, "lora.json")
    assert "2 computed, 0 cached" in printed
    for task in summary["tasks"].values():
        folder = _vector_dir(task)
        adapted = {
            name.removesuffix(".lora_A")
            for name in load_file(folder / "adapter.safetensors")
            if name.endswith(".lora_A")
        }
        assert adapted and all(
            name.endswith(("q_proj.weight", "v_proj.weight")) for name in adapted
        )
        grams = load_file(folder / "statistics" / "gram-n16" / "statistics.safetensors")
        fisher = load_file(folder / "statistics" / "fisher-n8" / "statistics.safetensors")
        assert set(grams) == adapted and set(fisher) == adapted
        assert all(bool(f.sum() > 0) for f in fisher.values())
    assert Path(summary["model"]["uri"].removeprefix("file://"), "transformers").is_dir()

"""`mergeline merge` as a user runs it: task vectors of a real pipeline run, merged by the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from storage.artifacts import find_artifact, write_artifact
from storage.objectstore import open_store
from storage.shards import SafetensorsReader
from storage.taskvectors import (
    read_adapter_task_vector,
    read_base_model,
    read_task_vector,
    write_task_vector,
)
from storage.tensors import tensors_to_bytes
from workers.adapters.factors import Factor, LoraDelta, factors_from_tensors, factors_to_tensors
from workers.merge import merge
from workers.models.merged import load_merged

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def mergeline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"COLUMNS": "200", "NO_COLOR": "1"}
    command = [sys.executable, "-m", "pipelines.cli", "merge", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(directory) as reader:
        return {name: reader.read(name) for name in reader.names()}


@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory: pytest.TempPathFactory, local_ray) -> Path:
    """A store with a base model and two task vectors, built by running the tiny pipeline."""
    from tests.conftest import TINY_SPEC

    root = tmp_path_factory.mktemp("merge-command")
    spec = dict(TINY_SPEC)
    spec["storage"] = {"uri": f"file://{root}/store"}
    spec["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "tiny"}
    run_pipeline(validate_document(spec), Console(file=open(os.devnull, "w")))  # noqa: SIM115
    return root / "store"


@pytest.fixture(scope="module")
def adapter_store(tmp_path_factory: pytest.TempPathFactory, local_ray) -> Path:
    """A store with a base model and two LoRA task vectors (``finetune.adapter``)."""
    from tests.conftest import TINY_SPEC

    root = tmp_path_factory.mktemp("merge-adapters")
    spec = dict(TINY_SPEC) | {"finetune": TINY_SPEC["finetune"] | {"adapter": {"r": 4}}}
    spec["storage"] = {"uri": f"file://{root}/store"}
    spec["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "tiny-lora"}
    run_pipeline(validate_document(spec), Console(file=open(os.devnull, "w")))  # noqa: SIM115
    return root / "store"


def test_merge_from_the_store_equals_the_in_memory_merge(pipeline_store: Path, tmp_path) -> None:
    store = open_store(f"file://{pipeline_store}")
    [base_key] = store.list("base-models")
    vectors, heads, uris = {}, {}, {}
    for key in store.list("task-vectors"):
        task = find_artifact(store, f"task-vectors/{key}").meta["task"]
        if task not in ("perm1", "perm2"):
            continue  # another test adds a foreign task vector to this store
        vectors[task], heads[task] = read_task_vector(store, key)
        uris[task] = store.url(f"task-vectors/{key}")
    base = read_base_model(store, base_key)
    perm2_uri = uris["perm2"]
    tasks = ["--task", "perm1", "--task", perm2_uri]  # by task name, and by URI
    for method, params, coefficient in [
        ("ties", ["--param", "density=0.5", "--param", "scope=per_tensor"], 0.7),
        ("ties", ["--param", "density=0.3"], 1.1),
        ("task_arithmetic", [], 0.4),
    ]:
        out = tmp_path / f"{method}-{coefficient}"
        done = mergeline(
            "--base", f"base-models/{base_key}", *tasks, "--method", method, *params,
            "--coefficient", str(coefficient), "--out", str(out),
            "--store", f"file://{pipeline_store}", "--shard-mb", "1", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "merged 2 task vectors" in done.stdout
        expected = merge(method, base, vectors, coefficient, **parse(params))
        merged = read_all(out)
        for name in base:
            assert torch.equal(merged[name], expected[name]), (method, name)
        _, state, loaded_heads = load_merged(out)  # the pipeline's own loader reads it
        assert set(loaded_heads) == {"perm1", "perm2"}
        assert all(torch.equal(state[name], expected[name]) for name in base)
        assert (out / "merge.json").is_file() and (out / "model.safetensors.index.json").is_file()


def parse(params: list[str]) -> dict:
    values = dict(item.split("=", 1) for item in params[1::2])
    return {k: float(v) if k == "density" else v for k, v in values.items()}


def test_a_corrupt_task_vector_or_another_base_is_refused(pipeline_store: Path, tmp_path) -> None:
    store = open_store(f"file://{pipeline_store}")
    [base_key] = store.list("base-models")
    other = {"w": torch.zeros(2)}
    files = {"delta.safetensors": tensors_to_bytes(other), "head.safetensors": tensors_to_bytes({})}
    write_artifact(
        store, "task-vectors/foreign", files, {"task": "foreign", "base_digest": "0" * 64}
    )
    args = ["--base", f"base-models/{base_key}", "--store", f"file://{pipeline_store}"]
    done = mergeline(
        *args, "--task", "task-vectors/foreign", "--out", str(tmp_path / "a"), cwd=tmp_path
    )
    assert done.returncode == 2 and "was built from base 000000000000" in done.stderr
    assert not (tmp_path / "a").exists()

    key = next(k for k in store.list("task-vectors") if k != "foreign")
    path = pipeline_store / "task-vectors" / key / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        done = mergeline(*args, "--task", key, "--out", str(tmp_path / "b"), cwd=tmp_path)
    finally:
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    assert done.returncode == 2, done.stderr
    assert "checksum mismatch" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_a_hugging_face_base_merges_into_a_model_transformers_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from workers.models.huggingface import weights_digest

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = read_all(tmp_path / "base")
    store = open_store(f"file://{tmp_path}/store")
    vectors = {}
    for index, task in enumerate(("alpha", "beta")):
        generator = torch.Generator().manual_seed(index)
        vectors[task] = {
            n: 0.01 * torch.randn(t.shape, generator=generator) for n, t in base.items()
        }
        stored = {f"encoder.{n}": t for n, t in vectors[task].items()}  # the pipeline's names
        files = {"delta.safetensors": tensors_to_bytes(stored),
                 "head.safetensors": tensors_to_bytes({})}  # fmt: skip
        digest = weights_digest(tmp_path / "base")  # what the pipeline records for this base
        meta = {"kind": "task_vector", "task": task, "base_digest": digest}
        write_artifact(store, f"task-vectors/{task}-key", files, meta)
    done = mergeline(
        "--base", str(tmp_path / "base"), "--task", "alpha", "--task", "beta", "--method", "ties",
        "--param", "scope=per_tensor", "--coefficient", "0.9", "--out", str(tmp_path / "out"),
        "--store", f"file://{tmp_path}/store", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    expected = merge("ties", base, vectors, 0.9, scope="per_tensor")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_pipeline_task_vectors_merge_onto_the_local_directory_they_were_built_from(
    tmp_path: Path, local_ray
) -> None:
    """Issue 19 defect 6: one base digest for the pipeline and `merge --base DIR`."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from tests.hf_fixtures import write_text_task, write_tiny_bert

    base_dir = write_tiny_bert(tmp_path / "tiny-bert")
    weights = load_file(str(base_dir / "model.safetensors"))
    position_ids = torch.arange(64).unsqueeze(0)  # a buffer in the file, as MiniLM's has
    save_file(weights | {"embeddings.position_ids": position_ids},
              str(base_dir / "model.safetensors"), {"format": "pt"})  # fmt: skip
    spec = {
        "name": "words",
        "base_model": {"source": "hf", "model": str(base_dir), "max_length": 16},
        "tasks": [
            {"name": f"words{i}", "dataset": write_text_task(tmp_path / f"w{i}", i, 60, 30)}
            for i in (1, 2)
        ],
        "finetune": {"steps": 3, "batch_size": 16, "lr": 1e-3},
        "merge": {"candidates": [{"method": "task_arithmetic",
                                  "coefficient": {"start": 0.5, "stop": 1, "num": 2}}]},
        "storage": {"uri": f"file://{tmp_path}/store"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "words"},
    }  # fmt: skip
    summary = run_pipeline(validate_document(spec), Console(file=open(os.devnull, "w")))  # noqa: SIM115
    coefficients = json.dumps(summary["best"]["coefficients"])
    done = mergeline(
        "--base", str(base_dir), "--task", "words1", "--task", "words2",
        "--coefficient", coefficients, "--out", str(tmp_path / "out"),
        "--store", f"file://{tmp_path}/store", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    merged = read_all(tmp_path / "out")
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    published = load_file(str(model_dir / "transformers" / "model.safetensors"))
    assert set(merged) == set(published) | {"embeddings.position_ids"}
    for name, tensor in published.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
    assert torch.equal(merged["embeddings.position_ids"], position_ids)
    AutoModel.from_pretrained(tmp_path / "out", local_files_only=True)


def test_adapter_task_vectors_merge_like_their_dense_deltas_in_memory(
    adapter_store: Path, tmp_path: Path
) -> None:
    """Each ΔW = s·B·A is computed from the stored factors as the engine reaches it; the
    result is the in-memory merge of the dense deltas, also with a dense task vector beside."""
    store = open_store(f"file://{adapter_store}")
    [base_key] = store.list("base-models")
    base = read_base_model(store, base_key)
    base_meta = find_artifact(store, f"base-models/{base_key}").meta
    vectors, keys = {}, {}
    for key in store.list("task-vectors"):
        meta = find_artifact(store, f"task-vectors/{key}").meta
        assert meta["format"] == "lora"
        tensors, _ = read_adapter_task_vector(store, key)
        vectors[meta["task"]] = dict(LoraDelta(factors_from_tensors(tensors, key), base))
        keys[meta["task"]] = key
    assert set(vectors) == {"perm1", "perm2"}
    generator = torch.Generator().manual_seed(3)
    vectors["dense3"] = {
        n: 0.01 * torch.randn(t.shape, generator=generator) for n, t in base.items()
    }
    _, head = read_adapter_task_vector(store, keys["perm1"])
    meta = {"kind": "task_vector", "task": "dense3", "mode": "standard", "num_classes": 10}
    write_task_vector(
        store, "dense3", vectors["dense3"], head, meta | {"base_digest": base_meta["digest"]}
    )

    per_tensor = ["--param", "density=0.5", "--param", "scope=per_tensor"]
    cases = [
        ("task_arithmetic", [], 0.4, ["perm1", "perm2"]),
        ("ties", ["--param", "density=0.3"], 1.1, ["perm1", "perm2"]),  # global trim
        ("ties", per_tensor, 0.9, ["perm1", "perm2", "dense3"]),  # adapters and a dense one
        ("task_arithmetic", [], {"perm2": 0.3, "dense3": 0.6}, ["perm2", "dense3"]),
    ]
    for index, (method, params, coefficient, tasks) in enumerate(cases):
        out = tmp_path / f"{index}-{method}"
        done = mergeline(
            "--base", f"base-models/{base_key}", *[a for t in tasks for a in ("--task", t)],
            "--method", method, *params, "--coefficient", json.dumps(coefficient),
            "--out", str(out), "--store", f"file://{adapter_store}", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"merged {len(tasks)} task vectors" in done.stdout
        expected = merge(method, base, {t: vectors[t] for t in tasks}, coefficient, **parse(params))
        _, state, heads = load_merged(out)
        assert set(heads) == set(tasks)
        for name in base:
            torch.testing.assert_close(state[name], expected[name], msg=f"{method} {name}")
        assert any(not torch.equal(state[name], base[name]) for name in base)

    path = adapter_store / "task-vectors" / keys["perm2"] / "adapter.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte changed
    try:
        done = mergeline(
            "--base", f"base-models/{base_key}", "--task", "perm1", "--task", "perm2",
            "--out", str(tmp_path / "corrupt"), "--store", f"file://{adapter_store}", cwd=tmp_path,
        )  # fmt: skip
    finally:
        path.write_bytes(data)
    assert done.returncode == 2 and "checksum mismatch" in done.stderr, done.stderr[-2000:]
    assert "adapter.safetensors" in done.stderr and not (tmp_path / "corrupt").exists()


def test_an_adapter_and_a_dense_task_vector_merge_onto_a_hugging_face_base(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from workers.models.huggingface import weights_digest

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = read_all(tmp_path / "base")
    digest = weights_digest(tmp_path / "base")
    store = open_store(f"file://{tmp_path}/store")
    generator = torch.Generator().manual_seed(1)
    dense = {n: 0.01 * torch.randn(t.shape, generator=generator) for n, t in base.items()}
    factors = {
        name: Factor(
            torch.randn(2, 16, generator=generator), torch.randn(16, 2, generator=generator), 0.05
        )
        for name in base
        if name.endswith(("q_proj.weight", "v_proj.weight"))
    }
    head = tensors_to_bytes({})
    files = {"delta.safetensors": tensors_to_bytes({f"encoder.{n}": t for n, t in dense.items()}),
             "head.safetensors": head}  # fmt: skip
    meta = {"kind": "task_vector", "base_digest": digest}
    write_artifact(store, "task-vectors/dense-key", files, meta | {"task": "dense"})
    stored = factors_to_tensors({f"encoder.{n}": f for n, f in factors.items()})  # pipeline names
    files = {"adapter.safetensors": tensors_to_bytes(stored), "head.safetensors": head}
    write_artifact(store, "task-vectors/lora-key", files, meta | {"task": "lora", "format": "lora"})

    vectors = {"dense": dense, "lora": dict(LoraDelta(factors, base))}
    for method, tasks in [("ties", ["lora", "dense"]), ("task_arithmetic", ["lora"])]:
        out = tmp_path / method
        done = mergeline(
            "--base", str(tmp_path / "base"), *[a for t in tasks for a in ("--task", t)],
            "--method", method, "--coefficient", "0.9", "--out", str(out),
            "--store", f"file://{tmp_path}/store", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        expected = merge(method, base, {t: vectors[t] for t in tasks}, 0.9)
        state = AutoModelForCausalLM.from_pretrained(out).state_dict()
        for name, tensor in expected.items():
            torch.testing.assert_close(state[name], tensor, msg=f"{method} {name}")

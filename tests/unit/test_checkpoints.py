"""Resumable fine-tunes without services: checkpoint files, their store layout, run identity."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load

from pipelines.run.recovery import TaskFailedError, task_failed, without_tasks
from pipelines.run.scheduling import finetune_options
from pipelines.spec.load import validate_document
from pipelines.spec.plan import make_plan, task_vector_key
from pipelines.stages.training import load_checkpoint
from storage.checkpoints import (
    count_attempts,
    delete_checkpoints,
    latest_checkpoint,
    record_attempt,
    write_checkpoint,
)
from storage.errors import ArtifactError, DataError, SpecError, StorageError
from storage.objectstore import open_store
from storage.runstate import begin_run, finish_run, read_run_state, unfinished_run
from storage.staged import TensorFile
from workers.finetune import DivergenceError, TrainConfig
from workers.finetune.checkpoint import decode_state, encode_state
from workers.finetune.deepspeed_engine import DeepSpeedEngine, deepspeed_config, inputs_for
from workers.finetune.engine import Classifier, TorchEngine, cross_entropy
from workers.finetune.loop import fit
from workers.finetune.shards import ShardedState, even_range
from workers.models import build_backbone

BACKBONE = {"source": "builtin", "name": "mlp", "hidden": [16], "features": 4, "seed": 0}
CONFIG = TrainConfig(steps=40, batch_size=32, lr=1e-2, weight_decay=1e-4, seed=3)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    return x, (x[:, 0] - x[:, 2] > 0).astype(np.int64)


def _engine() -> TorchEngine:
    head = {
        "weight": torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),
        "bias": torch.zeros(2),
    }
    return TorchEngine(Classifier(build_backbone(BACKBONE, 6), head), CONFIG)


class _Stop(Exception):
    pass


def _checkpoint_at(step: int) -> dict[str, bytes | TensorFile]:
    """The files of the checkpoint a run writes after ``step`` steps (then it is killed)."""
    saved: list[dict[str, bytes | TensorFile]] = []

    def keep(state) -> None:
        saved.append(encode_state(state, {"task": "t"}))
        raise _Stop

    with pytest.raises(_Stop):
        fit(_engine(), *_data(), CONFIG, "t", checkpoint_every=step, on_checkpoint=keep)
    return saved[0]


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does() -> None:
    straight = _engine()
    history = fit(straight, *_data(), CONFIG, "t")
    files = _checkpoint_at(15)
    state, meta = decode_state(files, "checkpoint")
    assert state.step == 15 and meta == {"task": "t"} and len(state.history) == 15
    resumed = _engine()
    resumed_history = fit(resumed, *_data(), CONFIG, "t", start=state)
    assert resumed_history == history
    for name, value in straight.model_state().items():
        assert torch.equal(resumed.model_state()[name], value)


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    write_checkpoint(open_store(f"file://{tmp_path}"), "k", 10, _checkpoint_at(10), {})
    stored = tmp_path / "checkpoints" / "k" / "step-000000010"
    files = {path.name: path.read_bytes() for path in stored.iterdir()}
    assert sorted(files) == [
        "manifest.json",
        "optimizer-rank-00000-of-00001.safetensors",
        "rng.safetensors",
        "state.json",
        "weights-rank-00000-of-00001.safetensors",
    ]
    optimizer = load(files["optimizer-rank-00000-of-00001.safetensors"])
    assert {k.rpartition("/")[2] for k in optimizer} == {"exp_avg", "exp_avg_sq"}
    weights = load(files["weights-rank-00000-of-00001.safetensors"])
    assert set(weights) == {k.rpartition("/")[0] for k in optimizer}
    assert set(load(files["rng.safetensors"])) == {"batches", "torch"}
    document = json.loads(files["state.json"])
    assert document["step"] == 10 and document["world_size"] == 1
    assert document["optimizer_info"]["param_groups"][0]["lr"] == CONFIG.lr
    assert document["optimizer_info"]["step"] == 10.0
    shapes, ranges = document["shapes"], document["ranges"]
    assert ranges == [{name: [0, math.prod(shape)] for name, shape in shapes.items()}]
    assert all(weights[name].shape == (math.prod(shape),) for name, shape in shapes.items())


def test_divergence_names_the_task_and_step_through_the_engine() -> None:
    x, y = _data()
    x[7] = 3e38  # finite input that overflows the first layer
    with pytest.raises(DivergenceError, match=r"task 'bad'.*step \d+"):
        fit(_engine(), x, y, TrainConfig(50, 200, 1e-3), "task 'bad'")


def test_the_store_keeps_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    assert latest_checkpoint(store, "k") is None
    write_checkpoint(store, "k", 10, {"a.json": b"10"}, {})
    write_checkpoint(store, "k", 20, {"a.json": b"20"}, {})
    assert [p.name for p in (tmp_path / "checkpoints" / "k").iterdir()] == ["step-000000020"]
    assert latest_checkpoint(store, "k") == (20, {"a.json": b"20"})
    # A newer checkpoint whose manifest never got written does not exist for readers.
    store.put("checkpoints/k/step-000000030/a.json", b"30")
    assert latest_checkpoint(store, "k") == (20, {"a.json": b"20"})
    # A corrupt newest one is skipped for an older intact one.
    write_checkpoint(store, "k", 40, {"a.json": b"40"}, {})
    write_checkpoint(store, "j", 5, {"a.json": b"5"}, {})
    (tmp_path / "checkpoints" / "k" / "step-000000040" / "a.json").write_bytes(b"xx")
    store.put("checkpoints/k/step-000000020/a.json", b"20")  # (deleted when 40 was written)
    store.create("checkpoints/k/step-000000020/manifest.json", _manifest_of(b"20"))
    assert latest_checkpoint(store, "k") == (20, {"a.json": b"20"})

    assert (record_attempt(store, "k"), record_attempt(store, "k")) == (1, 2)
    assert count_attempts(store, "k") == 2 and count_attempts(store, "j") == 0
    delete_checkpoints(store, "k")
    assert latest_checkpoint(store, "k") is None and count_attempts(store, "k") == 0
    assert not (tmp_path / "checkpoints" / "k").exists()
    assert latest_checkpoint(store, "j") == (5, {"a.json": b"5"})


def _manifest_of(data: bytes) -> bytes:
    import hashlib

    table = {"a.json": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
    return json.dumps({"format_version": 1, "files": table, "meta": {}}).encode()


def test_a_rerun_continues_the_unfinished_run_until_it_succeeds(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    assert begin_run(store, "key", "run-1") == ("run-1", 1)
    assert begin_run(store, "key", "run-2") == ("run-1", 2)  # after a crash: the same run
    assert unfinished_run(store, "key") == "run-1"
    assert read_run_state(store, "run-1")["status"] == "running"
    finish_run(store, "key", "run-1")
    assert read_run_state(store, "run-1")["status"] == "succeeded"
    assert unfinished_run(store, "key") is None
    assert begin_run(store, "key", "run-3") == ("run-3", 1)  # the next run is a new one


def test_execution_settings_do_not_change_the_task_vector_key(tiny_spec: dict) -> None:
    plan = make_plan(validate_document(tiny_spec))
    tiny_spec["finetune"] |= {"checkpoint_every": 5, "on_task_failure": "skip"}
    other = make_plan(validate_document(tiny_spec))
    assert task_vector_key("b", "d", plan.finetune) == task_vector_key("b", "d", other.finetune)
    tiny_spec["finetune"]["deepspeed"] = {"zero_stage": 2}
    engine = make_plan(validate_document(tiny_spec))
    assert task_vector_key("b", "d", engine.finetune) != task_vector_key("b", "d", plan.finetune)


@pytest.mark.parametrize(
    ("finetune", "message"),
    [
        ({"resources": {"num_workers": 2}}, "set finetune.deepspeed"),
        ({"deepspeed": {"zero_stage": 2}, "resources": {"num_workers": 3}}, "split evenly"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"on_task_failure": "retry"}, "on_task_failure"),
    ],
)
def test_bad_distributed_settings_are_refused(tiny_spec: dict, finetune: dict, message: str):
    tiny_spec["finetune"] |= finetune
    with pytest.raises(SpecError, match=message):
        validate_document(tiny_spec)


def test_zero_stage_3_runs_standard_fp32_fine_tunes_only(tiny_spec: dict) -> None:
    tiny_spec["finetune"]["deepspeed"] = {"zero_stage": 3}
    plan = make_plan(validate_document(tiny_spec))  # standard mode, fp32
    assert finetune_options(plan)["max_retries"] == 2
    for settings, message in [
        ({"precision": "bf16"}, "ZeRO stage 3 is not supported yet"),
        ({"mode": "linear"}, "forward-mode AD"),
        ({"adapter": {"r": 2}}, "partition the frozen base"),
    ]:
        with pytest.raises(SpecError, match=message):
            validate_document(tiny_spec | {"finetune": tiny_spec["finetune"] | settings})


def test_deepspeed_config_comes_from_the_spec() -> None:
    config = deepspeed_config(CONFIG, zero_stage=2, world_size=2)
    assert config["train_batch_size"] == 32 and config["train_micro_batch_size_per_gpu"] == 16
    assert config["optimizer"]["params"] | {} == {
        "lr": CONFIG.lr,
        "weight_decay": CONFIG.weight_decay,
        "torch_adam": True,
        "adam_w_mode": False,
    }
    assert config["gradient_clipping"] == 0.0 and config["bf16"] == {"enabled": False}
    assert config["fp16"] == {"enabled": False} and config["gradient_accumulation_steps"] == 1
    assert config["zero_optimization"] == {"stage": 2, "compute_grad_norm": False}
    bf16 = deepspeed_config(replace(CONFIG, precision="bf16"), zero_stage=1, world_size=1)
    assert bf16["bf16"] == {"enabled": True} and bf16["zero_optimization"] == {"stage": 1}
    assert bf16["fp16"] == {"enabled": False}
    fp16 = deepspeed_config(replace(CONFIG, precision="fp16"), zero_stage=2, world_size=1)
    assert fp16["fp16"] == {"enabled": True} and fp16["bf16"] == {"enabled": False}
    # 32 examples per step = 2 workers x 4 micro-batches of 4; clipping needs the norm.
    settings = replace(CONFIG, grad_accumulation=4, max_grad_norm=0.5)
    many = deepspeed_config(settings, zero_stage=2, world_size=2)
    assert many["train_batch_size"] == 32 and many["train_micro_batch_size_per_gpu"] == 4
    assert many["gradient_accumulation_steps"] == 4 and many["gradient_clipping"] == 0.5
    assert many["zero_optimization"] == {"stage": 2}


def test_deepspeed_casts_only_floating_inputs_to_bf16() -> None:
    cpu = torch.device("cpu")
    ids = torch.tensor([[3, 300, 7]])  # 300 is not exactly representable in bf16
    features = torch.ones(1, 3)
    assert inputs_for(ids, cpu, torch.bfloat16).dtype == torch.int64
    assert torch.equal(inputs_for(ids, cpu, torch.bfloat16), ids)
    assert inputs_for(features, cpu, torch.bfloat16).dtype == torch.bfloat16
    assert inputs_for(features, cpu, torch.float16).dtype == torch.float16
    assert inputs_for(features, cpu, torch.float32).dtype == torch.float32
    # The engine's own loss hands its module what inputs_for made (no DeepSpeed needed).
    seen: list[torch.dtype] = []

    def module(inputs: torch.Tensor) -> torch.Tensor:
        seen.append(inputs.dtype)
        return torch.zeros(len(inputs), 2)

    engine = object.__new__(DeepSpeedEngine)
    engine.engine, engine.device, engine.dtype = module, cpu, torch.bfloat16
    engine.loss_fn = cross_entropy
    engine.loss(ids, torch.tensor([0]))
    engine.loss(features, torch.tensor([0]))
    assert seen == [torch.int64, torch.bfloat16]


def test_a_failing_task_fails_the_run_or_is_left_out(tiny_spec: dict) -> None:
    error = DataError("task 'perm2': bad inputs")
    with pytest.raises(TaskFailedError, match=r"task 'perm2' failed: DataError: .*bad inputs"):
        task_failed("perm2", error, "fail", [])
    assert task_failed("perm2", error, "skip", []) == "DataError: task 'perm2': bad inputs"
    with pytest.raises(StorageError):  # not the task's own error: never skipped
        task_failed("perm2", StorageError("access denied"), "skip", [])

    plan = make_plan(validate_document(tiny_spec))
    smaller = without_tasks(plan, {"perm2": "DataError: ..."})
    assert smaller.task_names == ["perm1"] and smaller.spec_digest == plan.spec_digest
    with pytest.raises(TaskFailedError, match="every task"):
        without_tasks(plan, {"perm1": "x", "perm2": "y"})


def test_a_sharded_state_reads_only_the_parts_that_overlap_a_range() -> None:
    weights = torch.arange(10, dtype=torch.float32)
    ranges = [{"w": (0, 4)}, {"w": (4, 7)}, {"w": (7, 10)}]  # as three ranks held it
    loaded: list[int] = []

    def part(rank: int):
        def load_part() -> dict[str, torch.Tensor]:
            loaded.append(rank)
            start, stop = ranges[rank]["w"]
            return {"w": weights[start:stop].clone(), "w/exp_avg": -weights[start:stop]}

        return load_part

    parts = [part(rank) for rank in range(3)]
    state = ShardedState({"w": (2, 5)}, ranges, parts, parts, ["exp_avg"])
    assert torch.equal(state.read("w", 5, 7), weights[5:7]) and loaded == [1]
    assert torch.equal(state.read("w", 3, 8, "exp_avg"), -weights[3:8])  # another worker count
    assert sorted(loaded) == [0, 1, 1, 2]  # each part loaded once per kind, when first needed
    assert torch.equal(dict(state.weights())["w"], weights.reshape(2, 5))
    with pytest.raises(ArtifactError, match="do not cover"):
        ShardedState({"w": (2, 5)}, [{"w": (0, 4)}, {"w": (5, 10)}], parts[:2], parts[:2], [])
    assert even_range(10, 3, 4) == (9, 10) and even_range(2, 3, 4) == (2, 2)


def test_a_checkpoint_of_an_older_format_is_deleted_and_ignored(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    old = {"state.json": json.dumps({"format": 1, "step": 20}).encode()}
    write_checkpoint(store, "k", 20, old, {})
    assert load_checkpoint(store, "k") is None
    assert latest_checkpoint(store, "k") is None  # gone, so that newer ones are not shadowed
    write_checkpoint(store, "k", 10, _checkpoint_at(10), {})
    state = load_checkpoint(store, "k")
    assert state is not None and state.step == 10 and state.shards.world_size == 1

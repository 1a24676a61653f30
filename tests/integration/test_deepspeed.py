"""DeepSpeed on CPU (gloo): the engine against the plain loop, exact resume, data parallelism.

DeepSpeed's first start on a machine compiles a small communication op (about 90 s, cached in
``~/.cache/torch_extensions``); these tests start it in few processes.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from pipelines.run.dag import finetune_submitter
from pipelines.run.fingerprint import fingerprint_datasets, fingerprint_pretrain
from pipelines.spec.load import validate_document
from pipelines.spec.plan import make_plan, task_vector_key
from pipelines.spec.refs import DatasetRef
from pipelines.stages.base import pretrain_base_job
from pipelines.stages.jobs import FinetuneJob, PretrainJob
from storage.objectstore import open_store
from storage.taskvectors import read_task_vector
from workers.finetune import LinearizedModel, TrainConfig
from workers.finetune.checkpoint import decode_state, encode_state
from workers.finetune.engine import Classifier, TorchEngine
from workers.finetune.loop import fit
from workers.models import build_backbone

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BACKBONE = {"source": "builtin", "name": "mlp", "hidden": [16], "features": 4, "seed": 0}
CONFIG = TrainConfig(steps=24, batch_size=32, lr=1e-2, weight_decay=1e-4)


@pytest.fixture
def process_group_env():
    """DeepSpeed's one-process group sets RANK, MASTER_PORT, ...: keep them out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def _model(mode: str) -> Classifier:
    backbone = build_backbone(BACKBONE, 6)
    # A strong head: gradient norms well above 1, so any clipping DeepSpeed adds would show.
    weight = 10 * torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    head = {"weight": weight, "bias": torch.zeros(2)}
    if mode == "linear":
        theta0 = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        return Classifier(LinearizedModel(backbone, theta0), head)
    return Classifier(backbone, head)


def _first_gradient_norm(mode: str) -> float:
    model, (x, y) = _model(mode), _data()
    loss = torch.nn.functional.cross_entropy(
        model(torch.from_numpy(x[:32])), torch.from_numpy(y[:32])
    )
    loss.backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm())


def _assert_same(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=atol)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("mode", ["standard", "linear"])
def test_deepspeed_matches_the_plain_loop_and_resumes_exactly(
    mode: str, process_group_env: None
) -> None:
    from workers.finetune.deepspeed_engine import DeepSpeedEngine

    x, y = _data()
    assert _first_gradient_norm(mode) > 2.0
    plain = TorchEngine(_model(mode), CONFIG)
    fit(plain, x, y, CONFIG, "t")
    expected = plain.model_state()
    assert any(value.abs().max() > 0 for value in expected.values())

    # ZeRO-3 partitions the weights too; linear mode refuses it (no forward-mode AD there).
    stages = (0, 1, 2, 3) if mode == "standard" else (0, 1, 2)
    for stage in stages:
        engine = DeepSpeedEngine(_model(mode), CONFIG, stage)
        assert engine.name == "deepspeed" and engine.world_size == 1
        fit(engine, x, y, CONFIG, "t")
        _assert_same(engine.model_state(), expected)

    for stage in (0, 2, 3)[: len(stages) - 1]:  # stop after a checkpoint; a fresh engine resumes
        saved = []

        def stop(state, saved=saved, stage=stage) -> None:
            saved.append(encode_state(state, {"stage": stage}))
            raise _Stop

        with pytest.raises(_Stop):
            fit(DeepSpeedEngine(_model(mode), CONFIG, stage), x, y, CONFIG, "t", None, 10, stop)
        state, meta = decode_state(saved[0], "checkpoint")
        assert state.step == 10 and meta == {"stage": stage}
        assert state.shards.optimizer_keys == ["exp_avg", "exp_avg_sq"]
        assert state.optimizer_info["step"] == 10
        resumed = DeepSpeedEngine(_model(mode), CONFIG, stage)
        history = fit(resumed, x, y, CONFIG, "t", start=state)
        assert [h["step"] for h in history] == list(range(CONFIG.steps))
        _assert_same(resumed.model_state(), expected)


def test_deepspeed_accumulates_schedules_and_clips_like_the_plain_loop(
    process_group_env: None,
) -> None:
    from workers.finetune.deepspeed_engine import DeepSpeedEngine

    x, y = _data()
    config = replace(
        CONFIG, grad_accumulation=2, lr_schedule="linear", warmup_steps=5, max_grad_norm=1.0
    )
    plain = TorchEngine(_model("standard"), config)
    fit(plain, x, y, config, "t")
    expected = plain.model_state()
    unclipped = TorchEngine(_model("standard"), replace(config, max_grad_norm=None))
    fit(unclipped, x, y, replace(config, max_grad_norm=None), "t")
    assert any((unclipped.model_state()[k] - v).abs().max() > 1e-3 for k, v in expected.items())
    for stage in (0, 2):
        engine = DeepSpeedEngine(_model("standard"), config, stage)
        assert engine.config["gradient_accumulation_steps"] == 2
        fit(engine, x, y, config, "t")
        _assert_same(engine.model_state(), expected, atol=1e-5)
    saved: list = []

    def stop(state) -> None:
        saved.append(state)
        raise _Stop

    with pytest.raises(_Stop):
        fit(DeepSpeedEngine(_model("standard"), config, 2), x, y, config, "t", None, 10, stop)
    assert saved[0].step_state["scheduler"]["last_epoch"] == 10
    resumed = DeepSpeedEngine(_model("standard"), config, 2)
    fit(resumed, x, y, config, "t", start=saved[0])
    _assert_same(resumed.model_state(), expected, atol=1e-5)


def test_deepspeed_on_cpu_compiles_no_inference_kernel(process_group_env: None) -> None:
    """DeepSpeed's CPU backend would compile a shared-memory all-reduce kernel on its first
    start (about 90 s) that only tensor-parallel inference uses: training never builds it."""
    from deepspeed import comm

    from workers.finetune.deepspeed_engine import DeepSpeedEngine

    x, y = _data()
    engine = DeepSpeedEngine(_model("standard"), CONFIG, 2)
    fit(engine, x, y, CONFIG, "t")
    assert comm.comm.cdb is not None and comm.comm.cdb.shm_comm_op is None


def test_deepspeed_bf16_trains_on_cpu_with_fp32_master_weights(process_group_env: None) -> None:
    from workers.finetune.deepspeed_engine import DeepSpeedEngine

    x, y = _data()
    plain = TorchEngine(_model("standard"), CONFIG)
    fit(plain, x, y, CONFIG, "t")
    config = replace(CONFIG, precision="bf16")
    engine = DeepSpeedEngine(_model("standard"), config, 2)
    assert engine.config["bf16"] == {"enabled": True}
    history = fit(engine, x, y, config, "t")
    assert history[-1]["loss"] < history[0]["loss"]
    state = engine.model_state()
    assert all(value.dtype == torch.float32 for value in state.values())
    differences = [(state[k] - v).abs().max().item() for k, v in plain.model_state().items()]
    assert 0 < max(differences) < 0.1


@pytest.mark.usefixtures("local_ray")
def test_two_workers_give_the_same_task_vector_as_one_with_zero2_and_zero3(
    tiny_spec: dict, tmp_path: Path
) -> None:
    """``batch_size`` is the global batch: 2 Ray Train workers take half each. Under ZeRO-3
    the workers hold a partition of the weights, checkpoint their own parts and hand them over
    in the final checkpoint; the vector is the same."""
    runs = {"one": (1, 2), "two": (2, 2), "zero3": (2, 3)}  # name: (workers, ZeRO stage)
    vectors, executions = {}, {}
    base = None
    for name, (workers, stage) in runs.items():
        document = copy.deepcopy(tiny_spec)
        document["storage"] = {"uri": f"file://{tmp_path}/{name}"}
        document["finetune"] |= {
            "deepspeed": {"zero_stage": stage},
            "resources": {"num_cpus": 1, "num_workers": workers},
        }
        if stage == 3:
            document["finetune"]["checkpoint_every"] = 5
        plan = make_plan(validate_document(document))
        datasets = fingerprint_datasets(plan)
        base_key = fingerprint_pretrain(plan, datasets)
        store = open_store(document["storage"]["uri"])
        if base is None:
            input_dim = next(iter(datasets.values())).input_dim
            job = PretrainJob(
                {"uri": store.uri}, base_key, plan.base_model, plan.evaluation, input_dim
            )
            base, _ = pretrain_base_job(job)
        else:  # the same θ0 in the other stores
            shutil.copytree(tmp_path / "one" / "base-models", tmp_path / name / "base-models")
        task = plan.tasks[0]
        key = task_vector_key(base.digest, datasets[task.name].digest(), plan.finetune)
        dataset = DatasetRef(task.name, task.dataset)
        finetune = FinetuneJob(
            {"uri": store.uri}, key, dataset, base, plan.finetune, plan.evaluation
        )
        executions[name] = ray.get(finetune_submitter(plan)(finetune))
        vectors[name] = read_task_vector(store, key)[0]
        assert not (tmp_path / name / "checkpoints" / key).exists()  # gone with the vector

    for name, (workers, _) in runs.items():
        assert executions[name] == {
            "engine": "deepspeed",
            "workers": workers,
            "attempts": 1,
            "resumed_from_step": 0,
        }
    assert any(value.abs().max() > 1e-3 for value in vectors["one"].values())
    _assert_same(vectors["two"], vectors["one"], atol=1e-6)
    _assert_same(vectors["zero3"], vectors["one"], atol=1e-6)

"""Resumable training of one task on one worker (rank), with checkpoints in the store.

The same function runs in a plain Ray task (one worker) and on every rank of a Ray Train worker
group (``resources.num_workers > 1``). Every rank loads the data and θ0 itself and resumes from
the newest checkpoint of the task vector's key; rank 0 alone writes checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelines.stages.base import kind_of, load_task_data, open_base
from pipelines.stages.jobs import FinetuneJob
from pipelines.stages.pause import pause_point
from storage.checkpoints import latest_checkpoint, record_attempt, write_checkpoint
from storage.objectstore import open_store_from
from workers.adapters import lora_trainable
from workers.finetune import LinearizedModel, TrainConfig
from workers.finetune.checkpoint import decode_state, encode_state
from workers.finetune.engine import Engine, StateDict, TorchEngine, TrainState
from workers.finetune.loop import fit


@dataclass(frozen=True)
class TrainRequest:
    """What every worker needs to train one task: the fine-tune job and the small frozen head."""

    job: FinetuneJob
    head: dict[str, torch.Tensor]

    @property
    def key(self) -> str:
        return self.job.key

    @property
    def task(self) -> str:
        return self.job.task

    @property
    def finetune(self) -> dict[str, Any]:
        return self.job.finetune

    @property
    def what(self) -> str:
        return f"task '{self.task}'"


@dataclass(frozen=True)
class TrainOutcome:
    """The trained parameters (consolidated fp32) and how the run got there."""

    model: StateDict
    history: list[dict[str, float]]
    engine: str
    resumed_from_step: int


def train_config(finetune: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_settings(finetune)


def build_model(
    backbone: torch.nn.Module, theta0: StateDict, request: TrainRequest, private: bool = False
) -> torch.nn.Module:
    """backbone (or its linearization around θ0) as the task's kind trains it (e.g. through
    the frozen head). With ``finetune.adapter``: a LoRA copy of it, trained (or linearized) in
    the adapter's parameters only (on ``backbone`` itself if it is ``private``: not used after)."""
    kind = kind_of(request.job.base.config)
    mode, adapter = request.finetune["mode"], request.finetune.get("adapter")
    if adapter is not None:  # LoRA (PEFT); linear mode linearizes in its parameters only
        seed = int(request.finetune.get("seed", 0))
        trainable = lora_trainable(backbone, adapter, mode, seed, in_place=private)
    elif mode == "linear":
        trainable = LinearizedModel(backbone, theta0, kind.frozen_in_linear_mode(backbone))
    else:
        trainable = backbone
    return kind.trainable(trainable, request.head)


def make_engine(model: torch.nn.Module, request: TrainRequest) -> Engine:
    config = train_config(request.finetune)
    loss = kind_of(request.job.base.config).loss
    deepspeed = request.finetune.get("deepspeed")
    if deepspeed is not None:
        from workers.finetune.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, config, int(deepspeed["zero_stage"]), loss)
    gpus = request.finetune["resources"]["num_gpus"] > 0 and torch.cuda.is_available()
    return TorchEngine(model, config, "cuda" if gpus else "cpu", loss)


def train_task(request: TrainRequest, keep_final: bool = False) -> TrainOutcome:
    """Train (or resume training) one task on this worker; collective over all workers.

    ``keep_final``: rank 0 also stores the final state as a checkpoint (how a worker group
    hands its result to the coordinating task).
    """
    job = request.job
    store = open_store_from(job.store)
    base = open_base(job.store, job.base.key, job.base.meta)
    backbone, theta0 = base.backbone, base.theta0
    data = load_task_data(base, job.dataset.source, job.evaluation, job.dataset.what)
    model = build_model(backbone, theta0, request, private=True)
    config = train_config(request.finetune)
    start = load_latest(request)
    resumed = start.step if start else 0
    if start is not None and start.step >= config.steps:  # finished before it was handed over
        return TrainOutcome(start.model, start.history, _engine_name(request), resumed)
    engine = make_engine(model, request)
    if engine.rank == 0:
        record_attempt(store, request.key)
    meta = {
        "task": request.task,
        "engine": engine.name,
        "mode": request.finetune["mode"],
        "workers": engine.world_size,
        "resumed_from_step": resumed,
    }

    def save(state: TrainState) -> None:
        if engine.rank == 0:
            files = encode_state(state, meta | {"step": state.step})
            write_checkpoint(store, request.key, state.step, files, meta | {"step": state.step})
            pause_point(request.task, state.step, store.uri)

    model.train()
    history = fit(
        engine,
        data.x_train,
        data.y_train,
        config,
        request.what,
        start=start,
        checkpoint_every=request.finetune.get("checkpoint_every"),
        on_checkpoint=save,
        checkpoint_final=keep_final,
    )
    model.eval()
    return TrainOutcome(engine.model_state(), history, engine.name, resumed)


def _engine_name(request: TrainRequest) -> str:
    return "torch" if request.finetune.get("deepspeed") is None else "deepspeed"


def load_latest(request: TrainRequest) -> TrainState | None:
    """The newest checkpoint of this task vector, or None (then training starts at step 0)."""
    store = open_store_from(request.job.store)
    found = latest_checkpoint(store, request.key)
    if found is None:
        return None
    step, files = found
    state, _ = decode_state(files, store.url(f"checkpoints/{request.key}/step-{step:09d}"))
    return state


def read_final(request: TrainRequest) -> TrainOutcome:
    """The final state a worker group stored with ``keep_final``."""
    store = open_store_from(request.job.store)
    found = latest_checkpoint(store, request.key)
    if found is None or found[0] != request.finetune["steps"]:
        raise RuntimeError(f"{request.what}: the worker group ended without its final state")
    state, meta = decode_state(found[1], store.url(f"checkpoints/{request.key}"))
    return TrainOutcome(state.model, state.history, meta["engine"], meta["resumed_from_step"])

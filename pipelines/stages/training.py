"""Resumable training of one task on one worker (rank), with checkpoints in the store.

The same function runs in a plain Ray task (one worker) and on every rank of a Ray Train worker
group (``resources.num_workers > 1``). Every rank loads the data and θ0 itself and resumes from
the newest checkpoint of the task vector's key, reading only the parts of it that overlap what
it holds. Every rank writes its own part of a checkpoint; rank 0 then writes the index and the
manifest, which makes the checkpoint visible only once every part is in the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.stages.base import Base, kind_of, load_task_data, open_base
from pipelines.stages.jobs import FinetuneJob
from pipelines.stages.pause import pause_point
from storage.checkpoints import (
    delete_checkpoint,
    latest_checkpoint,
    record_attempt,
    write_checkpoint,
    write_checkpoint_part,
)
from storage.objectstore import ObjectStore, open_store_from
from workers.adapters import lora_trainable
from workers.finetune import LinearizedModel, TrainConfig
from workers.finetune.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_format,
    decode_state,
    index_files,
    rank_files,
)
from workers.finetune.engine import Engine, StateDict, TorchEngine, TrainState
from workers.finetune.loop import fit
from workers.finetune.shards import ShardedState


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
    """The trained parameters (fp32, each assembled when it is looked up) and how the run got
    there."""

    model: Mapping[str, torch.Tensor]
    history: list[dict[str, float]]
    engine: str
    resumed_from_step: int
    module: torch.nn.Module | None = None  # trained in this process on a base handed in


def train_config(finetune: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_settings(finetune)


def build_model(
    backbone: torch.nn.Module, theta0: StateDict, request: TrainRequest, private: bool = False
) -> torch.nn.Module:
    """backbone (or its linearization around θ0) as the task's kind trains it (e.g. through
    the frozen head). With ``finetune.adapter``: a LoRA copy of it, trained (or linearized) in
    the adapter's parameters only (in ``backbone``'s own modules if ``private``: its owner
    removes the adapter after, or drops the backbone)."""
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


def train_task(
    request: TrainRequest, keep_final: bool = False, base: Base | None = None
) -> TrainOutcome:
    """Train (or resume training) one task on this worker; collective over all workers.

    ``keep_final``: rank 0 also stores the final state as a checkpoint (how a worker group
    hands its result to the coordinating task). ``base``: the base the caller already holds
    (one worker on the CPU, torch engine: see :func:`trains_on_callers_base`); the model is
    built on it in place and handed back as ``module``, so that the process holds the base
    once (an adapter's LoRA layers stay in ``base.backbone`` until the caller removes them
    with :func:`~workers.adapters.without_lora`). Without it, this worker opens its own.
    """
    job = request.job
    store = open_store_from(job.store)
    handed_in = base is not None  # the caller keeps the trained model itself
    if base is None:
        base = open_base(job.store, job.base.key, job.base.meta)
    backbone, theta0 = base.backbone, base.theta0
    data = load_task_data(base, job.dataset.source, job.evaluation, job.dataset.what)
    model = build_model(backbone, theta0, request, private=True)
    config = train_config(request.finetune)
    start = load_latest(request)
    resumed = start.step if start else 0
    if start is not None and start.step >= config.steps:  # finished before it was handed over
        weights = _weights(start)
        return TrainOutcome(weights, start.history, _engine_name(request), resumed)
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
        save_checkpoint(store, request.key, engine, state, meta | {"step": state.step})
        if engine.rank == 0:
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
    # A worker group hands its weights over in the final checkpoint: none consolidates them.
    # A model handed back holds its trained values itself.
    weights = {} if keep_final or handed_in else engine.model_state()
    return TrainOutcome(weights, history, engine.name, resumed, model if handed_in else None)


def trains_on_callers_base(request: TrainRequest) -> bool:
    """Whether the coordinating task can hand its own base to :func:`train_task`: one worker,
    the torch engine on the CPU (DeepSpeed and a GPU move or recast the model they train)."""
    finetune = request.finetune
    resources = finetune["resources"]
    return (
        resources.get("num_workers", 1) == 1
        and finetune.get("deepspeed") is None
        and not (resources.get("num_gpus", 0) > 0 and torch.cuda.is_available())
    )


def save_checkpoint(
    store: ObjectStore, key: str, engine: Engine, state: TrainState, meta: dict[str, Any]
) -> None:
    """Store this rank's part of ``state`` (collective: every rank calls it). Each rank puts its
    own files; rank 0, once it has every rank's file entries and ranges, writes the index and
    the manifest that makes the checkpoint visible."""
    entries = write_checkpoint_part(store, key, state.step, rank_files(state))
    parts = engine.gather_json({"files": entries, "ranges": state.shards.ranges})
    if engine.rank == 0:
        ranges = [part["ranges"] for part in parts]
        written = {name: entry for part in parts for name, entry in part["files"].items()}
        write_checkpoint(store, key, state.step, index_files(state, ranges, meta), meta, written)


def _engine_name(request: TrainRequest) -> str:
    return "torch" if request.finetune.get("deepspeed") is None else "deepspeed"


def load_latest(request: TrainRequest) -> TrainState | None:
    """The newest checkpoint of this task vector, or None (then training starts at step 0)."""
    return load_checkpoint(open_store_from(request.job.store), request.key)


def load_checkpoint(store: ObjectStore, key: str) -> TrainState | None:
    """The newest checkpoint of ``key``, its parts read only where a range is needed; None if
    there is none. One in another format (written by an older version) is deleted, ignored."""
    while (found := latest_checkpoint(store, key)) is not None:
        step, files = found
        if checkpoint_format(files) == CHECKPOINT_FORMAT:
            return decode_state(files, store.url(f"checkpoints/{key}/step-{step:09d}"))[0]
        delete_checkpoint(store, key, step)
    return None


def _weights(state: TrainState) -> Mapping[str, torch.Tensor]:
    shards = state.shards
    return shards.weights() if isinstance(shards, ShardedState) else {}


def read_final(request: TrainRequest) -> TrainOutcome:
    """The final state a worker group stored with ``keep_final``."""
    store = open_store_from(request.job.store)
    found = latest_checkpoint(store, request.key)
    if found is None or found[0] != request.finetune["steps"]:
        raise RuntimeError(f"{request.what}: the worker group ended without its final state")
    state, meta = decode_state(found[1], store.url(f"checkpoints/{request.key}"))
    weights = _weights(state)
    return TrainOutcome(weights, state.history, meta["engine"], meta["resumed_from_step"])

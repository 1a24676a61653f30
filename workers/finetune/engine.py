"""Training engines: what one optimisation step runs on, behind one small protocol.

The loop (:func:`workers.finetune.loop.fit`) draws batches, checks the loss and checkpoints; an
:class:`Engine` computes the loss and applies the update. :class:`TorchEngine` is plain PyTorch
(Adam on one process); `workers.finetune.deepspeed_engine.DeepSpeedEngine` runs the same step
through DeepSpeed, possibly data-parallel over several processes.

Engines hand out their state *per rank* (:mod:`workers.finetune.shards`): each rank its own
range of every parameter's fp32 weights and optimizer state, whatever it holds under ZeRO, and
take it back from a :class:`~workers.finetune.shards.ShardedState` that re-slices the saved
ranks' parts to their own ranges. A checkpoint written by one engine layout therefore resumes
on any other (one worker or many, ZeRO 0 to 3). Only :meth:`Engine.model_state`, at the end,
consolidates the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from workers.finetune.settings import (
    TrainConfig,
    autocast,
    enable_gradient_checkpointing,
    load_scheduler_state,
    make_scheduler,
    scheduler_state,
)
from workers.finetune.shards import RankShard, ShardedState, even_range

StateDict = dict[str, Tensor]
#: ``(outputs, inputs, labels) -> mean loss``: what a task kind trains on (default: classes)
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, inputs: Tensor, labels: Tensor) -> Tensor:
    """Classification: cross entropy of the logits against the labels."""
    return nn.functional.cross_entropy(outputs.float(), labels.to(outputs.device))


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where this one stopped."""

    step: int  # optimiser steps completed
    history: list[dict[str, float]]
    shards: RankShard | ShardedState  # this rank's part (saving), or every rank's (resuming)
    optimizer_info: dict[str, Any]  # JSON-able: hyperparameters of each group, Adam's step
    rng: StateDict = field(default_factory=dict)  # "batches" and "torch" generator states
    step_state: dict[str, Any] = field(default_factory=dict)  # JSON-able: LR schedule, scaler


class Engine(Protocol):
    """One optimisation step on one worker, and this worker's part of the job's state."""

    name: str  # "torch" or "deepspeed"
    rank: int
    world_size: int
    device: torch.device

    def loss(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """The mean loss of this worker's share of the batch (with its autograd graph)."""
        ...

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all workers (the batch's loss when shares are equal)."""
        ...

    def update(self, loss: Tensor) -> None:
        """Backward of one micro-batch's loss; every ``grad_accumulation``-th call also takes
        one optimizer step (gradients averaged over the micro-batches and the workers)."""
        ...

    def model_state(self) -> StateDict:
        """The trained parameters, fp32, consolidated (collective with several workers)."""
        ...

    def shard_state(self) -> tuple[RankShard, dict[str, Any]]:
        """This rank's part of the weights and optimizer state, and the optimizer's JSON-able
        info (hyperparameters of each group, Adam's step); no communication."""
        ...

    def gather_json(self, value: Any) -> list[Any]:
        """``value`` (JSON-able) of every rank, by rank, on rank 0; ``[]`` on the others."""
        ...

    def step_state(self) -> dict[str, Any]:
        """JSON-able: the LR scheduler's state and the loss scaler's (fp16), if any."""
        ...

    def load_state(
        self,
        shards: ShardedState,
        info: dict[str, Any],
        step_state: dict[str, Any] | None = None,
    ) -> None:
        """Restore what every rank's :meth:`shard_state` and :meth:`step_state` returned, read
        back for this rank's own ranges (the saved run may have had another worker count)."""
        ...


class FrozenHead(nn.Module):
    """A fixed linear head (``weight``, ``bias``): buffers, so it never trains or checkpoints."""

    def __init__(self, head: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.register_buffer("weight", head["weight"].detach().clone(), persistent=False)
        self.register_buffer("bias", head["bias"].detach().clone(), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        # In the features' dtype: an engine may hold the model (not these buffers) in bf16.
        dtype = features.dtype
        return features @ self.weight.T.to(dtype) + self.bias.to(dtype)


class Classifier(nn.Module):
    """backbone -> head; the head is a trainable module or a frozen ``{weight, bias}``."""

    def __init__(self, backbone: nn.Module, head: nn.Module | Mapping[str, Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head if isinstance(head, nn.Module) else FrozenHead(head)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.backbone(inputs))


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def load_trained(module: nn.Module, model: Mapping[str, Tensor]) -> None:
    """Copy trained parameter values (as :meth:`Engine.model_state` returns them) in place."""
    copy_trained(trainable_parameters(module), model)


def copy_trained(parameters: Mapping[str, nn.Parameter], model: Mapping[str, Tensor]) -> None:
    """Copy ``model``'s values into ``parameters``, one at a time (``model`` may assemble each
    value only when it is looked up, e.g. :meth:`ShardedState.weights`)."""
    if set(parameters) != set(model):
        missing, extra = sorted(set(parameters) - set(model)), sorted(set(model) - set(parameters))
        raise ValueError(f"trained state does not fit the model: missing {missing}, extra {extra}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(model[name].to(parameter.device, parameter.dtype))


def replicated_shard(
    parameters: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[RankShard, dict[str, Any]]:
    """This rank's even share of state every rank holds whole (a plain torch optimizer over
    ``parameters``, in the optimizer's order): weights and same-sized optimizer tensors."""
    by_id = {id(p): name for name, p in parameters.items()}
    shapes, ranges, tensors = {}, {}, {}
    step = None
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = by_id[id(parameter)]
            start, stop = even_range(parameter.numel(), rank, world_size)
            shapes[name], ranges[name] = tuple(parameter.shape), (start, stop)
            tensors[name] = _flat(parameter, start, stop)
            for key, value in optimizer.state.get(parameter, {}).items():
                if key == "step":
                    step = float(value)
                elif isinstance(value, Tensor) and value.shape == parameter.shape:
                    tensors[f"{name}/{key}"] = _flat(value, start, stop)
    return RankShard(rank, world_size, shapes, ranges, tensors), optimizer_info(
        optimizer, [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]], step
    )


def _flat(value: Tensor, start: int, stop: int) -> Tensor:
    return value.detach().reshape(-1)[start:stop].float().cpu().clone()


def optimizer_info(
    optimizer: torch.optim.Optimizer, names: list[str], step: float | None
) -> dict[str, Any]:
    """The JSON-able rest of an optimizer's state: each group's hyperparameters and parameter
    names (``names``: the optimizer's parameters in order), and Adam's step (None before it)."""
    groups, index = [], 0
    for group in optimizer.param_groups:
        hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        count = len(hyper.pop("params"))
        groups.append(hyper | {"params": names[index : index + count]})
        index += count
    return {"param_groups": groups, "step": step}


def load_replicated(
    parameters: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    shards: ShardedState,
    info: dict[str, Any],
) -> None:
    """Inverse of :func:`replicated_shard` on every rank: whole weights and optimizer state."""
    copy_trained(parameters, shards.weights())
    if info.get("step") is None:  # saved before the first optimizer step: no state yet
        return
    names = [name for group in info["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    state = {
        index[name]: {"step": torch.tensor(float(info["step"]))}
        | {key: shards.full(name, key) for key in shards.optimizer_keys}
        for name in names
    }
    groups = []
    for group in info["param_groups"]:
        restored = {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        restored["params"] = [index[name] for name in group["params"]]
        groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class TorchEngine:
    """Plain PyTorch on one process: Adam over the model's trainable parameters, with the LR
    schedule, autocast (plus a grad scaler for fp16), clipping and accumulation of ``config``."""

    name = "torch"
    rank, world_size = 0, 1

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        device: str | torch.device = "cpu",
        loss_fn: LossFn = cross_entropy,
    ) -> None:
        self.device = torch.device(device)
        self.config = config
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        parameters = trainable_parameters(model)
        self.optimizer = torch.optim.Adam(
            list(parameters.values()), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, config)
        fp16 = config.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.micro_batches = 0

    def loss(self, inputs: Tensor, labels: Tensor) -> Tensor:
        inputs = inputs.to(self.device)
        with autocast(self.config, self.device):
            return self.loss_fn(self.model(inputs), inputs, labels)

    def mean(self, value: float) -> float:
        return value

    def update(self, loss: Tensor) -> None:
        accumulation = self.config.grad_accumulation
        if accumulation > 1:  # the mean over micro-batches of equal size
            loss = loss / accumulation
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        self.micro_batches += 1
        if self.micro_batches % accumulation:
            return
        if self.config.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def model_state(self) -> StateDict:
        return {
            name: p.detach().float().cpu().clone()
            for name, p in trainable_parameters(self.model).items()
        }

    def shard_state(self) -> tuple[RankShard, dict[str, Any]]:
        return replicated_shard(trainable_parameters(self.model), self.optimizer)

    def gather_json(self, value: Any) -> list[Any]:
        return [value]

    def step_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scheduler": scheduler_state(self.scheduler)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state(
        self,
        shards: ShardedState,
        info: dict[str, Any],
        step_state: dict[str, Any] | None = None,
    ) -> None:
        load_replicated(trainable_parameters(self.model), self.optimizer, shards, info)
        load_step_state(self.scheduler, self.scaler, step_state or {})


def load_step_state(
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> None:
    """Restore what an engine's ``step_state`` returned. A checkpoint without a scheduler state
    comes from before LR schedules existed, i.e. from a constant LR: the fresh scheduler is it."""
    if "scheduler" in state:
        load_scheduler_state(scheduler, state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])

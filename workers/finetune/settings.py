"""What one fine-tune's training settings turn into, whatever the engine: the LR schedule, the
autocast dtype and gradient checkpointing.

The defaults (fp32, accumulation 1, constant LR without warmup, no clipping, no checkpointing)
run exactly the step the loop ran before these settings existed, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from storage.errors import MergelineError

Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["constant", "linear", "cosine"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tune's optimisation settings (the spec's ``finetune`` fields of the same names).

    ``batch_size`` is the global batch of one optimizer step: split evenly over the workers, and
    each worker's share into ``grad_accumulation`` micro-batches.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    grad_accumulation: int = 1
    lr_schedule: Schedule = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> TrainConfig:
        """The config from a mapping that holds (at least) its fields' names, e.g. a plan's
        ``finetune``; missing fields take their defaults."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """``config.lr_schedule`` over ``config.steps`` optimizer steps, after ``warmup_steps`` of
    linear warmup from 0 (transformers' schedules: step s of warmup runs at lr·s/warmup).

    A constant rate without warmup is a factor of 1 at every step, which needs no library:
    importing transformers' schedules costs a fine-tune process about 3 CPU-seconds."""
    name = config.lr_schedule
    if name == "constant" and not config.warmup_steps:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    from transformers import get_scheduler

    if name == "constant" and config.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
    )


def _constant(step: int) -> float:
    return 1.0


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The scheduler's state as JSON (its schedule functions are rebuilt from the config)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    return state


def load_scheduler_state(
    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]
) -> None:
    """Restore :func:`scheduler_state`, and the optimizer's current LR with it (a scheduler's
    own ``load_state_dict`` leaves the LR as it was until its next step)."""
    state = dict(state)
    lambdas = scheduler.state_dict().get("lr_lambdas")
    if lambdas is not None:
        state["lr_lambdas"] = lambdas
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    """Autocast to ``config.precision`` on ``device`` (disabled, a no-op, for fp32)."""
    dtype = AUTOCAST_DTYPES.get(config.precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=config.precision != "fp32")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing in every Hugging Face model inside ``model``.

    Non-reentrant checkpointing: it also works when the inputs need no gradient (a LoRA adapter
    over frozen embeddings). Raises a one-line error where no part of ``model`` supports it.
    """
    supported = [
        module
        for module in model.modules()
        if getattr(module, "supports_gradient_checkpointing", False)
        and hasattr(module, "gradient_checkpointing_enable")
    ]
    if not supported:
        raise MergelineError(
            "finetune.gradient_checkpointing needs a Hugging Face model that supports it "
            f"({type(model).__name__} has none): set it to false"
        )
    options = {"use_reentrant": False}
    for module in supported:
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

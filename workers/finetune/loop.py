"""The standard fine-tuning loop: plain PyTorch, readable in one sitting.

The backbone is trained through a frozen linear head (as the paper trains through frozen
zero-shot heads), so the task vector is a change of the backbone only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from storage.errors import MergelineError
from workers.models.heads import apply_head


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    seed: int = 0


class DivergenceError(MergelineError):
    """The loss became NaN or infinite during training."""


def train(
    backbone: nn.Module,
    head: dict[str, torch.Tensor] | nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    what: str,
    on_step: Callable[[int, float], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``backbone`` (and ``head`` if it is a module) with Adam on seeded mini-batches.

    Returns the loss history (one entry per step). Raises :class:`DivergenceError` naming
    ``what`` and the step if the loss stops being finite.
    """
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    parameters = list(backbone.parameters())
    if isinstance(head, nn.Module):
        parameters += list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    backbone.train()
    for step in range(config.steps):
        batch = torch.randint(
            0, len(labels), (min(config.batch_size, len(labels)),), generator=generator
        )
        features = backbone(inputs[batch])
        logits = head(features) if isinstance(head, nn.Module) else apply_head(head, features)
        loss = nn.functional.cross_entropy(logits, labels[batch])
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DivergenceError(
                f"{what}: the loss became {value} at step {step}: "
                "lower finetune.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": value})
        if on_step is not None:
            on_step(step, value)
    backbone.eval()
    return history

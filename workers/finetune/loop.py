"""The fine-tuning loop, readable in one sitting, over any :class:`~workers.finetune.engine.Engine`.

The backbone is trained through a frozen linear head (as the paper trains through frozen
zero-shot heads), so the task vector is a change of the backbone only.

Batches are drawn from one seeded generator as *global* batches; with several workers each takes
its equal share, so 1 or N workers take the same steps up to floating-point error. The loop can
start from a :class:`~workers.finetune.engine.TrainState` and hands one to ``on_checkpoint`` every
``checkpoint_every`` steps on every worker: its part of the model and optimizer, the generator's
position and the RNG, i.e. all a resumed run needs to continue as if it had never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from storage.errors import MergelineError
from workers.finetune.engine import Classifier, Engine, TorchEngine, TrainState
from workers.finetune.settings import TrainConfig
from workers.finetune.shards import RankShard, ShardedState


class DivergenceError(MergelineError):
    """The loss became NaN or infinite during training."""


def fit(
    engine: Engine,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    what: str,
    start: TrainState | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint_final: bool = False,
) -> list[dict[str, float]]:
    """Run ``config.steps`` steps (minus those ``start`` already did); returns the loss history.

    ``on_checkpoint`` gets the state every ``checkpoint_every`` steps, and after the last step
    too if ``checkpoint_final``.

    Raises :class:`DivergenceError` naming ``what`` and the step if the loss stops being finite
    (on every worker at once: the loss is averaged over workers before it is checked).
    """
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    batch_size = min(config.batch_size, len(labels))
    parts = engine.world_size * config.grad_accumulation
    if batch_size % parts:
        raise MergelineError(
            f"{what}: a batch of {batch_size} does not split evenly over {engine.world_size} "
            f"workers x {config.grad_accumulation} micro-batches: make finetune.batch_size a "
            "multiple of resources.num_workers x finetune.grad_accumulation"
        )
    share, micro = batch_size // engine.world_size, batch_size // parts
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    if start is not None:
        shards = start.shards
        if isinstance(shards, RankShard):  # straight from a one-rank run's on_checkpoint
            shards = ShardedState.of(shards)
        engine.load_state(shards, start.optimizer_info, start.step_state)
        restore_rng(start.rng, generator, engine.device)
        history = list(start.history)
    for step in range(start.step if start else 0, config.steps):
        batch = torch.randint(0, len(labels), (batch_size,), generator=generator)
        mine = batch[engine.rank * share : (engine.rank + 1) * share]
        value = 0.0
        for part in mine.split(micro):  # backward frees each micro-batch's graph before the next
            loss = engine.loss(inputs[part], labels[part])
            value += engine.mean(float(loss.detach())) / config.grad_accumulation
            if not math.isfinite(value):
                raise DivergenceError(
                    f"{what}: the loss became {value} at step {step}: "
                    "lower finetune.lr or check the data"
                )
            engine.update(loss)
        history.append({"step": step, "loss": value})
        if on_step is not None:
            on_step(step, value)
        done = step + 1
        periodic = bool(checkpoint_every) and done % checkpoint_every == 0
        final = done == config.steps
        if on_checkpoint and ((periodic and not final) or (final and checkpoint_final)):
            on_checkpoint(snapshot(engine, done, history, generator))
    return history


def snapshot(
    engine: Engine, step: int, history: list[dict[str, float]], generator: torch.Generator
) -> TrainState:
    """This rank's part of the engine's state after ``step`` steps (no communication)."""
    shard, info = engine.shard_state()
    rng = {"batches": generator.get_state(), "torch": torch.get_rng_state()}
    if engine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(engine.device)
    return TrainState(step, list(history), shard, info, rng, engine.step_state())


def restore_rng(rng: dict[str, torch.Tensor], generator: torch.Generator, device) -> None:
    generator.set_state(rng["batches"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


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

    Returns the loss history (one entry per step); ``backbone`` is trained in place.
    """
    engine = TorchEngine(Classifier(backbone, head), config)
    backbone.train()
    try:
        return fit(engine, x, y, config, what, on_step=on_step)
    finally:
        backbone.eval()

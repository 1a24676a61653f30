"""The per-task statistics data-aware merge methods read, from a fine-tuned model and its rows.

- ``gram`` (RegMean): for every ``nn.Linear`` whose weight is asked for, the Gram matrix XᵀX
  of the layer's inputs, averaged per input row. A row is one example for flat inputs and one
  attended token for token inputs (``(rows, channels, length)`` int64 whose channel 1 is the
  attention mask, as both text kinds encode them): padding never counts.
- ``fisher`` (Fisher merging): the empirical diagonal Fisher E[(∂L/∂θ)²] of the kind's
  training loss, one example at a time (per-example gradients, not the square of a batch
  mean), for every parameter asked for.

Both are taken at the fine-tuned weights θ0 + τ_t as a plain network: for a linear-mode (or
tangent-space LoRA) task vector that is the weight-space model θ0 + τ_t, the model every merge
method's result is published as. For a LoRA task vector they cover the base weights the adapter
changes (its target modules), in weight space: every other tensor has τ = 0 and merges to θ0.
Rows are the first ``n`` of the task's training split (the split is already shuffled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

Loss = Callable[[Tensor, Tensor, Tensor], Tensor]


def token_mask(inputs: Tensor) -> Tensor | None:
    """The attention mask of token inputs ``(rows, channels, length)``; None for features."""
    if inputs.dtype == torch.int64 and inputs.dim() == 3 and inputs.shape[1] >= 2:
        return inputs[:, 1, :].bool()
    return None


def _prefix_of(model: nn.Module, network: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is network:
            return f"{name}." if name else ""
    raise ValueError("the network is not part of the trainable model")


def _batches(x: np.ndarray, y: np.ndarray, n: int, size: int) -> Iterable[tuple[Tensor, Tensor]]:
    rows = min(n, len(x))
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        yield torch.as_tensor(x[start:stop]), torch.as_tensor(y[start:stop])


def gram_matrices(
    network: nn.Module,
    forward: Callable[[Tensor], Tensor],
    names: Iterable[str],
    x: np.ndarray,
    y: np.ndarray,
    n: int,
    batch_size: int = 16,
) -> dict[str, Tensor]:
    """XᵀX / rows of the inputs of each ``nn.Linear`` of ``network`` whose weight is in
    ``names``, over the first ``n`` rows, running ``forward`` (the model at θ_t) on them."""
    wanted = set(names)
    grams: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[Tensor | None] = [None]

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            inputs = args[0].detach()
            current = mask[0]
            if current is not None and inputs.shape[:-1] == current.shape:
                inputs = inputs[current]
            flat = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + flat.T @ flat
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return accumulate

    handles = [
        module.register_forward_pre_hook(hook(f"{path}.weight"))
        for path, module in network.named_modules()
        if isinstance(module, nn.Linear) and f"{path}.weight" in wanted
    ]
    try:
        with torch.no_grad():
            for inputs, _ in _batches(x, y, n, batch_size):
                mask[0] = token_mask(inputs)
                forward(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (grams[name] / max(counts[name], 1)).float() for name in sorted(grams)}


def diagonal_fisher(
    model: nn.Module,
    network: nn.Module,
    theta: Mapping[str, Tensor],
    names: Iterable[str],
    loss: Loss,
    x: np.ndarray,
    y: np.ndarray,
    n: int,
) -> dict[str, Tensor]:
    """mean over the first ``n`` rows of (∂ loss / ∂θ)² for each of ``names``, at ``theta``
    (the network's weights; ``model`` is what the kind trains: the network, or it and a head)."""
    prefix = _prefix_of(model, network)
    wanted = sorted(set(names) & set(theta))
    params = {name: theta[name].detach().clone().requires_grad_(True) for name in wanted}
    frozen = {name: tensor for name, tensor in theta.items() if name not in params}
    fisher = {name: torch.zeros_like(tensor) for name, tensor in params.items()}
    rows = 0
    for inputs, labels in _batches(x, y, n, 1):
        state = {prefix + k: v for k, v in (frozen | params).items()}
        outputs = functional_call(model, state, (inputs,))
        grads = torch.autograd.grad(loss(outputs, inputs, labels), list(params.values()))
        for name, grad in zip(params, grads, strict=True):
            fisher[name] += grad.detach() ** 2
        rows += 1
    return {name: value / max(rows, 1) for name, value in fisher.items()}

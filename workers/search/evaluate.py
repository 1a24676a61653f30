"""Scoring a backbone state on labelled splits, without touching the module's own weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from workers.models.heads import apply_head


@torch.no_grad()
def features_at(
    backbone: nn.Module, state: dict[str, torch.Tensor], x: np.ndarray | torch.Tensor
) -> torch.Tensor:
    inputs = torch.as_tensor(x)
    return functional_call(backbone, state, (inputs,))


@torch.no_grad()
def accuracy(
    backbone: nn.Module,
    state: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
) -> float:
    """Top-1 accuracy of ``head`` on the backbone's features at parameters ``state``."""
    logits = apply_head(head, features_at(backbone, state, x))
    labels = torch.as_tensor(y)
    return int((logits.argmax(dim=1) == labels).sum()) / max(len(labels), 1)


def at_state(backbone: nn.Module, state: dict[str, torch.Tensor]):
    """The backbone's forward at parameters ``state`` (its own weights untouched). For a causal
    LM it also takes a KV cache's keywords (``kv_cache``: ``workers.search.lm_metrics``)."""

    def forward(inputs: torch.Tensor, **cached: Any) -> torch.Tensor:
        with torch.no_grad():
            return functional_call(backbone, state, (inputs,), cached)

    forward.kv_cache = _takes_kv_cache(backbone)  # type: ignore[attr-defined]
    return forward


def forward_on(backbone: nn.Module, device: torch.device):
    """The backbone's own forward, without gradients; on a device other than the CPU each batch
    goes there and its outputs come back to the host in float32. Takes a KV cache's keywords
    like :func:`at_state`."""
    if device.type == "cpu":

        def forward(inputs: torch.Tensor, **cached: Any) -> torch.Tensor:
            with torch.no_grad():
                return backbone(inputs, **cached)

        forward.kv_cache = _takes_kv_cache(backbone)  # type: ignore[attr-defined]
        return forward

    def forward_on_device(inputs: torch.Tensor, **cached: Any) -> torch.Tensor:
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cached.items()}
        with torch.no_grad():
            return backbone(inputs.to(device), **moved).float().cpu()

    forward_on_device.kv_cache = _takes_kv_cache(backbone)  # type: ignore[attr-defined]
    return forward_on_device


def _takes_kv_cache(backbone: nn.Module) -> bool:
    return bool(getattr(backbone, "takes_kv_cache", False))


def linearized_at(
    backbone: nn.Module, theta0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
):
    """The forward of the linearized model f(x; θ0) + J f(x; θ0) · δ."""
    from workers.finetune.linearized import linearized_forward

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return linearized_forward(backbone, theta0, delta, inputs)

    return forward


def normalized(merged: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """acc_t(merged) / acc_t(single-task fine-tuned) per task."""
    return {task: merged[task] / max(finetuned[task], 1e-12) for task in merged}


@torch.no_grad()
def linearized_accuracy(
    backbone: nn.Module,
    theta0: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
) -> float:
    """Top-1 accuracy of the linearized model f(x; θ0) + J f(x; θ0) · δ under ``head``."""
    from workers.finetune.linearized import linearized_forward

    logits = apply_head(head, linearized_forward(backbone, theta0, delta, torch.as_tensor(x)))
    labels = torch.as_tensor(y)
    return int((logits.argmax(dim=1) == labels).sum()) / max(len(labels), 1)

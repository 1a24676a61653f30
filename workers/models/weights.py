"""Weights written into a module tensor by tensor, where the module already is.

A scorer builds one module (on its device, in the evaluation dtype) and writes each candidate's
merged tensors into it as the streaming merge engine yields them: peak memory is the module
plus one tensor, whatever the number of task vectors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from storage.errors import ModelError


@torch.no_grad()
def write_weights(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy each ``(name, tensor)`` into ``module``'s tensor of that name (cast to its dtype and
    device); every tensor of its state dict must be written. Returns the count written."""
    targets = module.state_dict()
    written: set[str] = set()
    for name, tensor in tensors:
        target = targets.get(name)
        if target is None:
            raise ModelError(
                f"weights name '{name}', which the model does not have: build the task vectors "
                "and the model from the same base"
            )
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelError(
                f"weights give '{name}' shape {tuple(tensor.shape)} but the model has "
                f"{tuple(target.shape)}: build them from the same base"
            )
        target.copy_(tensor, non_blocking=True)
        written.add(name)
    missing = [name for name in targets if name not in written]
    if missing:
        raise ModelError(
            f"weights lack '{missing[0]}' ({len(missing)} of the model's tensors in all): "
            "build them from the same base"
        )
    return len(written)

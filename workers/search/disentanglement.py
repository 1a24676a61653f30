"""Weight disentanglement error of a task pair (Ortiz-Jiménez et al. 2023, eq. 4).

ξ(α1, α2) = Σ_{t∈{1,2}} E_{x∈D_t} 1[pred(θ0 + α_t τ_t; x) ≠ pred(θ0 + α1 τ1 + α2 τ2; x)]

Zero means that adding the other task's vector does not change any prediction on this task's
inputs: the two task vectors act on disjoint regions of input space. Pure: predictions come
from a callable, so the same code runs on the exact fast path (linear mode) or on real forward
passes (standard mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Predict = Callable[[str, list[tuple[float, float]]], torch.Tensor]
"""(task, [(α1, α2), ...]) -> (B, N_task) predicted labels on that task's inputs."""


def disentanglement_errors(
    predict: Predict, tasks: tuple[str, str], alphas: Sequence[float]
) -> torch.Tensor:
    """ξ over the grid: entry [i, j] is ξ(α1 = alphas[i], α2 = alphas[j])."""
    first, second = tasks
    values = [float(a) for a in alphas]
    joint = [(a1, a2) for a1 in values for a2 in values]
    count = len(values)
    alone_first = predict(first, [(a, 0.0) for a in values])  # (n, N1)
    alone_second = predict(second, [(0.0, a) for a in values])  # (n, N2)
    joint_first = predict(first, joint).reshape(count, count, -1)
    joint_second = predict(second, joint).reshape(count, count, -1)
    error_first = (joint_first != alone_first[:, None, :]).double().mean(dim=2)
    error_second = (joint_second != alone_second[None, :, :]).double().mean(dim=2)
    return error_first + error_second

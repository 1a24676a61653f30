"""Per-task linear heads: fit by a linear probe on θ0 features, then frozen."""

from __future__ import annotations

import numpy as np
import torch


def fit_linear_probe(
    features: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression (L2, C=1) on frozen features; deterministic (lbfgs)."""
    from sklearn.linear_model import LogisticRegression  # a second of import: only when fitting

    probe = LogisticRegression(max_iter=2000, C=1.0)
    probe.fit(features, labels)
    weight = np.zeros((num_classes, features.shape[1]), dtype=np.float32)
    bias = np.zeros(num_classes, dtype=np.float32)
    if probe.coef_.shape[0] == 1:  # binary: sklearn keeps one row for the positive class
        weight[1], bias[1] = probe.coef_[0], probe.intercept_[0]
    else:
        weight[probe.classes_], bias[probe.classes_] = probe.coef_, probe.intercept_
    return {"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}


def apply_head(head: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    return features @ head["weight"].T + head["bias"]

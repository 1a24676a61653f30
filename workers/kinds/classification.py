"""The ``classification`` kind: a frozen linear-probe head on pooled features, accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from storage.errors import DataError
from workers.finetune.engine import Classifier
from workers.kinds.registry import Forward, Head, register_kind
from workers.models.heads import apply_head, fit_linear_probe


class Classification:
    name = "classification"
    metrics = ("accuracy",)
    report_metrics: tuple[str, ...] = ()

    @torch.no_grad()
    def fit_head(
        self, forward: Forward, x: np.ndarray, y: np.ndarray, num_classes: int, what: str
    ) -> Head:
        features = forward(torch.as_tensor(x))
        if not torch.isfinite(features).all():
            raise DataError(
                f"{what}: the base model's features of its training inputs are not finite: "
                "the inputs are too large for the model; standardise them"
            )
        return fit_linear_probe(features.numpy(), y, num_classes)

    def trainable(self, network: nn.Module, head: Head) -> nn.Module:
        return Classifier(network, head)

    def loss(self, outputs: Tensor, inputs: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs.float(), labels.to(outputs.device))

    @torch.no_grad()
    def score(
        self,
        forward: Forward,
        head: Head,
        x: np.ndarray,
        y: np.ndarray,
        metric: str,
        settings: Mapping[str, Any],
    ) -> float:
        """Top-1 accuracy of ``head`` on the features (all rows in one pass, as always)."""
        logits = apply_head(head, forward(torch.as_tensor(x)))
        labels = torch.as_tensor(y)
        return int((logits.argmax(dim=1) == labels).sum()) / max(len(labels), 1)


register_kind(Classification())

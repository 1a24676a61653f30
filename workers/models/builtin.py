"""Builtin backbones, built from a config: small models that train on a CPU in seconds."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from storage.errors import ModelError


class MLPBackbone(nn.Module):
    """Input -> GELU hidden layers -> a GELU feature layer (the heads sit on the features)."""

    def __init__(self, input_dim: int, hidden: list[int], features: int) -> None:
        super().__init__()
        widths = [input_dim, *hidden, features]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)
        )
        self.feature_dim = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = nn.functional.gelu(layer(x))
        return x


def build_backbone(config: dict[str, Any], input_dim: int) -> nn.Module:
    """A freshly initialised backbone (seeded by ``config['seed']``)."""
    if config.get("source") != "builtin" or config.get("name") != "mlp":
        raise ModelError(
            f"base_model: unknown builtin model {config.get('name')!r}; known: ['mlp']"
        )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(config.get("seed", 0)))
    try:
        return MLPBackbone(input_dim, list(config["hidden"]), int(config["features"]))
    finally:
        torch.random.set_rng_state(generator_state)

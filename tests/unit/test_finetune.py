"""The standard training loop, heads and evaluation on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.digest import digest_state
from workers.finetune import DivergenceError, TrainConfig, train
from workers.models import build_backbone, fit_linear_probe
from workers.search.evaluate import accuracy, features_at

CONFIG = {"source": "builtin", "name": "mlp", "hidden": [16], "features": 4, "seed": 0}


def _data(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return x, y


def test_backbone_is_seeded() -> None:
    a, b = build_backbone(CONFIG, 6), build_backbone(CONFIG, 6)
    assert digest_state(a.state_dict()) == digest_state(b.state_dict())
    c = build_backbone(CONFIG | {"seed": 1}, 6)
    assert digest_state(a.state_dict()) != digest_state(c.state_dict())


def test_training_through_a_frozen_head_improves_accuracy_and_is_deterministic() -> None:
    x, y = _data()
    results = []
    for _ in range(2):
        backbone = build_backbone(CONFIG, 6)
        theta0 = {k: v.clone() for k, v in backbone.state_dict().items()}
        head = fit_linear_probe(features_at(backbone, theta0, x).numpy(), y, 2)
        before = accuracy(backbone, theta0, head, x, y)
        head_copy = {k: v.clone() for k, v in head.items()}
        history = train(backbone, head, x, y, TrainConfig(150, 32, 1e-2), "t")
        after = accuracy(backbone, backbone.state_dict(), head, x, y)
        assert all(torch.equal(head[k], head_copy[k]) for k in head)  # frozen
        assert history[-1]["loss"] < history[0]["loss"]
        results.append((before, after, digest_state(backbone.state_dict())))
    assert results[0][1] > results[0][0]
    assert results[0][2] == results[1][2]


def test_divergence_names_the_task_and_step() -> None:
    x, y = _data()
    x[5] = np.inf
    backbone = build_backbone(CONFIG, 6)
    head = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    with pytest.raises(DivergenceError, match=r"task 'bad'.*step \d+"):
        train(backbone, head, x, y, TrainConfig(200, 200, 1e-3), "task 'bad'")


def test_linear_probe_handles_binary_and_multiclass() -> None:
    x, y = _data()
    head = fit_linear_probe(x, y, 2)
    assert head["weight"].shape == (2, 6)
    logits = torch.from_numpy(x) @ head["weight"].T + head["bias"]
    assert float((logits.argmax(1).numpy() == y).mean()) > 0.9

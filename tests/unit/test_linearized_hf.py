"""Linear mode on a Hugging Face encoder: a tiny randomly initialised BERT built from a config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from workers.finetune import (  # noqa: E402
    LinearizedModel,
    TrainConfig,
    delta_between,
    linearized_forward,
    train,
)
from workers.merge import merge  # noqa: E402
from workers.models import apply_head, fit_linear_probe  # noqa: E402
from workers.models.huggingface import EncoderBackbone, encoder_from_config  # noqa: E402
from workers.search.fastpath import build_fast_path, linear_weights  # noqa: E402

VOCAB, LENGTH = 50, 12


def _config():
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )


def _tokens(seed: int, marker: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Token sequences with padding; the label says whether ``marker`` occurs in the text."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(n, LENGTH))
    lengths = rng.integers(4, LENGTH + 1, size=n)
    labels = rng.integers(0, 2, size=n)
    ids[ids == marker] = marker + 1
    for row in np.flatnonzero(labels):
        ids[row, rng.integers(0, lengths[row])] = marker
    mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    return torch.from_numpy(ids), torch.from_numpy(mask), labels.astype(np.int64)


def _features(backbone: EncoderBackbone, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return backbone(ids, mask).numpy()


def test_linear_mode_loads_eager_attention_and_trains_the_tangent_model() -> None:
    backbone = encoder_from_config(_config(), mode="linear", seed=0)
    assert backbone.encoder.config._attn_implementation == "eager"
    theta0 = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    ids, mask, labels = _tokens(0, marker=7)
    head = fit_linear_probe(_features(backbone, ids, mask), labels, 2)

    model = LinearizedModel(backbone, theta0)
    model.train()
    assert not backbone.training  # dropout stays off: the expansion point never moves

    def accuracy(delta: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            logits = apply_head(head, linearized_forward(backbone, theta0, delta, (ids, mask)))
        return float((logits.argmax(1).numpy() == labels).mean())

    before = accuracy({})
    history = _train_tokens(model, head, ids, mask, labels)
    delta = model.task_vector()
    assert list(delta) == list(theta0)
    assert history[-1] < history[0]
    assert accuracy(delta) > before
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in theta0.items())


def _train_tokens(model, head, ids, mask, labels) -> list[float]:
    """`train` feeds one input tensor: pack ids and mask side by side, unpack in the module."""

    class Packed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, packed: torch.Tensor) -> torch.Tensor:
            return self.inner(packed[:, :LENGTH].long(), packed[:, LENGTH:].long())

    packed = torch.cat([ids, mask], dim=1).numpy()
    history = train(Packed(), head, packed, labels, TrainConfig(60, 32, 3e-3), "bert")
    return [h["loss"] for h in history[:5]] + [h["loss"] for h in history[-5:]]


def test_the_fast_path_is_exact_through_attention() -> None:
    backbone = encoder_from_config(_config(), mode="linear", seed=1)
    theta0 = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    vectors = {
        task: {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in theta0.items()}
        for task in ("a", "b")
    }
    inputs, labels, heads = {}, {}, {}
    for index, task in enumerate(("a", "b")):
        ids, mask, y = _tokens(index, marker=7 + index, n=64)
        inputs[task], labels[task] = (ids, mask), torch.from_numpy(y)
        heads[task] = fit_linear_probe(_features(backbone, ids, mask), y, 2)
    fast = build_fast_path(backbone, theta0, vectors, heads, inputs, labels, batch_size=24)
    for coefficients in ({"a": 0.7, "b": -0.4}, {"a": 1.5, "b": 0.25}):
        weights = linear_weights("task_arithmetic", {}, coefficients, fast.sources)
        delta = delta_between(merge("task_arithmetic", theta0, vectors, coefficients), theta0)
        for task in ("a", "b"):
            with torch.no_grad():
                features = linearized_forward(backbone, theta0, delta, inputs[task])
            want = apply_head(heads[task], features)
            got = fast.logits(torch.tensor([weights]), task)[0]
            assert float((got - want).abs().max() / want.abs().max()) <= 1e-5

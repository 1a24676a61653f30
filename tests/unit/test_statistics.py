"""The statistics data-aware merges read: Gram matrices of linear inputs, diagonal Fisher."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.finetune.statistics import diagonal_fisher, gram_matrices, token_mask
from workers.search.evaluate import at_state


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_gram_matrices_are_the_mean_outer_products_of_each_layers_inputs():
    net = _Net()
    theta = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = np.zeros(10, dtype=np.int64)
    grams = gram_matrices(
        net, at_state(net, theta), ["first.weight", "second.weight"], x, y, n=7, batch_size=3
    )
    inputs = torch.as_tensor(x[:7])
    hidden = torch.tanh(net.first(inputs)).detach()
    assert torch.allclose(grams["first.weight"], inputs.T @ inputs / 7, atol=1e-6)
    assert torch.allclose(grams["second.weight"], hidden.T @ hidden / 7, atol=1e-6)
    only_second = gram_matrices(net, at_state(net, theta), ["second.weight"], x, y, n=7)
    assert list(only_second) == ["second.weight"]


def test_padding_tokens_do_not_count_in_a_gram_matrix():
    embed = nn.Embedding(10, 3)
    layer = nn.Linear(3, 2)
    net = nn.Module()
    net.embed, net.layer = embed, layer

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        return layer(embed(inputs[:, 0, :]))

    ids = np.array([[[1, 2, 0], [1, 1, 0]], [[3, 0, 0], [1, 0, 0]]], dtype=np.int64)
    assert token_mask(torch.as_tensor(ids)).tolist() == [[True, True, False], [True, False, False]]
    grams = gram_matrices(net, forward, ["layer.weight"], ids, np.zeros(2), n=2)
    attended = embed(torch.tensor([1, 2, 3])).detach()  # 3 attended tokens, not 6
    assert torch.allclose(grams["layer.weight"], attended.T @ attended / 3, atol=1e-6)


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient():
    net = _Net()
    theta = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    y = np.array([0, 1, 1, 0, 1])

    def loss(outputs, inputs, labels):
        return nn.functional.cross_entropy(outputs, labels)

    fisher = diagonal_fisher(net, net, theta, ["first.weight", "second.bias"], loss, x, y, n=4)
    assert sorted(fisher) == ["first.weight", "second.bias"]
    expected = torch.zeros_like(theta["first.weight"])
    for row in range(4):
        net.zero_grad()
        loss(
            net(torch.as_tensor(x[row : row + 1])), None, torch.as_tensor(y[row : row + 1])
        ).backward()
        expected += net.first.weight.grad**2
    assert torch.allclose(fisher["first.weight"], expected / 4, atol=1e-7)
    # the square of the batch gradient would be smaller: per-example it is
    assert bool((fisher["second.bias"] > 0).all())

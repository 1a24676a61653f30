"""RegMean and Fisher merging: hand-computed examples, properties, statistics checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.errors import MergeInputError
from workers.adapters import Factor, LoraDelta
from workers.merge import merge
from workers.merge.engine import merge_state


def _diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values))


def test_regmean_with_diagonal_grams_is_a_per_input_weighted_mean():
    base = {"w": torch.zeros(1, 2), "b": torch.tensor([1.0])}
    vectors = {
        "a": {"w": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([2.0])},
        "b": {"w": torch.tensor([[0.0, 4.0]]), "b": torch.tensor([4.0])},
    }
    grams = {"a": {"w": _diag(3.0, 1.0)}, "b": {"w": _diag(1.0, 1.0)}}
    merged = merge("regmean", base, vectors, 1.0, statistics=grams)
    # input 0: (3·2 + 1·0) / 4 = 1.5; input 1: (1·0 + 1·4) / 2 = 2; the bias: 1 + mean(2, 4)
    assert torch.allclose(merged["w"], torch.tensor([[1.5, 2.0]]))
    assert torch.allclose(merged["b"], torch.tensor([4.0]))
    half = merge("regmean", base, vectors, 0.5, statistics=grams)
    assert torch.allclose(half["w"], torch.tensor([[0.75, 1.0]]))


def test_regmean_alpha_scales_only_the_off_diagonal():
    base = {"w": torch.zeros(1, 2)}
    vectors = {"a": {"w": torch.tensor([[2.0, 0.0]])}, "b": {"w": torch.tensor([[0.0, 4.0]])}}
    coupled = {"a": {"w": torch.tensor([[3.0, 1.0], [1.0, 1.0]])}, "b": {"w": _diag(1.0, 1.0)}}
    # alpha 0: the off-diagonal 1s vanish and the result is the diagonal case above
    merged = merge("regmean", base, vectors, 1.0, alpha=0.0, statistics=coupled)
    assert torch.allclose(merged["w"], torch.tensor([[1.5, 2.0]]))
    # alpha 1: Σ G = [[4, 1], [1, 2]], Σ G τᵀ = [[6], [2]] + [[0], [4]] = [[6], [6]]
    # → [[4, 1], [1, 2]]⁻¹ [[6], [6]] = [[6/7], [18/7]]
    merged = merge("regmean", base, vectors, 1.0, alpha=1.0, statistics=coupled)
    assert torch.allclose(merged["w"], torch.tensor([[6 / 7, 18 / 7]]))


def test_regmean_is_the_least_squares_merge_of_the_layer_outputs():
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=generator)}
    inputs = {t: torch.randn(16, 4, generator=generator, dtype=torch.float64) for t in "ab"}
    vectors = {t: {"w": torch.randn(3, 4, generator=generator)} for t in "ab"}
    grams = {t: {"w": inputs[t].T @ inputs[t] / 16} for t in "ab"}
    merged = merge("regmean", base, vectors, 1.0, alpha=1.0, statistics=grams)
    # the same answer from numpy's least squares on the stacked inputs and targets
    x = np.concatenate([inputs[t].numpy() for t in "ab"])
    targets = np.concatenate(
        [inputs[t].numpy() @ (base["w"] + vectors[t]["w"]).double().numpy().T for t in "ab"]
    )
    expected = np.linalg.lstsq(x, targets, rcond=None)[0].T
    assert np.allclose(merged["w"].numpy(), expected, atol=1e-5)


def test_fisher_weights_each_entry_and_floors_unseen_ones_to_the_mean():
    base = {"p": torch.tensor([10.0, 10.0])}
    vectors = {"a": {"p": torch.tensor([1.0, 0.0])}, "b": {"p": torch.tensor([3.0, 2.0])}}
    fishers = {"a": {"p": torch.tensor([1.0, 0.0])}, "b": {"p": torch.tensor([3.0, 0.0])}}
    merged = merge("fisher", base, vectors, 1.0, statistics=fishers)
    # entry 0: (1·1 + 3·3) / 4 = 2.5; entry 1: no Fisher mass, floored equally → mean 1
    assert torch.allclose(merged["p"], torch.tensor([12.5, 11.0]))
    per_task = merge("fisher", base, vectors, {"a": 2.0, "b": 0.0}, statistics=fishers)
    assert torch.allclose(per_task["p"], torch.tensor([10.5, 10.0]))


def test_fisher_of_one_task_is_its_model():
    base = {"p": torch.tensor([1.0, -1.0])}
    vectors = {"a": {"p": torch.tensor([0.5, 2.0])}}
    merged = merge("fisher", base, vectors, 1.0, statistics={"a": {"p": torch.tensor([0.0, 9.0])}})
    assert torch.allclose(merged["p"], torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize(
    ("method", "statistics", "message"),
    [
        ("regmean", None, "no statistics given: 'regmean' reads each task's gram statistics"),
        ("fisher", {"a": {}}, "no fisher statistics for task 'b'"),
        ("regmean", {"a": {"w": torch.eye(3)}, "b": {}}, r"task 'a' tensor 'w' has shape \(3, 3\)"),
        ("fisher", {"a": {"w": -torch.ones(2, 2)}, "b": {}}, "has negative entries"),
    ],
)
def test_bad_statistics_are_named(method, statistics, message):
    base = {"w": torch.zeros(2, 2)}
    vectors = {t: {"w": torch.ones(2, 2)} for t in "ab"}
    with pytest.raises(MergeInputError, match=message):
        merge(method, base, vectors, 1.0, statistics=statistics)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_adapter_vectors_stream_with_their_statistics(method):
    """LoRA task vectors go through the streaming engine; each tensor gets its statistics."""
    generator = torch.Generator().manual_seed(3)
    base = {"q.weight": torch.randn(4, 6, generator=generator), "n.weight": torch.ones(4)}
    lora = {
        t: LoraDelta(
            {
                "q.weight": Factor(
                    torch.randn(2, 6, generator=generator),
                    torch.randn(4, 2, generator=generator),
                    0.5,
                )
            },
            base,
        )
        for t in "ab"
    }
    if method == "regmean":
        rows = {t: torch.randn(9, 6, generator=generator) for t in "ab"}
        stats = {t: {"q.weight": rows[t].T @ rows[t] / 9} for t in "ab"}
    else:
        stats = {
            t: {n: torch.rand(v.shape, generator=generator) for n, v in base.items()} for t in "ab"
        }
    streamed = merge_state(method, base, lora, 0.7, statistics=stats)
    dense = {t: dict(v) for t, v in lora.items()}
    in_memory = merge(method, base, dense, 0.7, statistics=stats)
    for name in base:
        assert torch.allclose(streamed[name], in_memory[name], atol=1e-6), name
    assert not torch.allclose(streamed["q.weight"], base["q.weight"])

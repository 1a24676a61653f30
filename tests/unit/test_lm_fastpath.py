"""The causal-LM fast path against real linearized forward passes of a tiny Llama.

Task vectors come from real linear-mode fine-tuning with the head frozen; every comparison is
in float32 (the model's dtype) against ``linearized_forward`` of the merged direction.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from storage.errors import MergeInputError, ModelError
from tests.lm_fixtures import tiny_llama
from workers.finetune.linearized import LinearizedModel, delta_between, linearized_forward
from workers.merge import merge
from workers.models.causal_lm import CausalLM, head_names
from workers.search.lm_fastpath import build_lm_fast_path, coefficient_vector
from workers.search.lm_metrics import completion_logits, completion_loss, token_accuracy

TASKS = ("a", "b", "c")
VOCAB, LENGTH, BATCH = 64, 12, 8
EMBED, HEAD = "lm.model.embed_tokens.weight", "lm.lm_head.weight"
RELATIVE = 1e-5


def packed_split(seed: int, shift: int, rows: int) -> torch.Tensor:
    """Right-padded ``(rows, 3, LENGTH)`` rows whose completion follows ``next = prev + shift``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, LENGTH), generator=generator)
    for column in range(3, LENGTH):
        ids[:, column] = 4 + (ids[:, column - 1] - 4 + shift) % (VOCAB - 4)
    used = torch.randint(5, LENGTH + 1, (rows,), generator=generator)
    columns = torch.arange(LENGTH)
    mask = (columns < used[:, None]).long()
    completion = mask * (columns >= 3).long()
    return torch.stack([ids * mask, mask, completion], dim=1)


def fine_tune(
    tie: bool, seed: int, shift: int, frozen: bool = True, steps: int = 4
) -> dict[str, torch.Tensor]:
    """A linear-mode task vector: a few Adam steps on the completion loss, head frozen."""
    model = CausalLM(tiny_llama(0, VOCAB, tie))
    theta0 = model.state_dict()
    linear = LinearizedModel(model, theta0, frozen=head_names(model) if frozen else ())
    optimizer = torch.optim.Adam(linear.parameters(), lr=2e-2)
    data = packed_split(100 + seed, shift, 32)
    for step in range(steps):
        batch = data[step * 8 % 32 : step * 8 % 32 + 8]
        optimizer.zero_grad()
        completion_loss(linear(batch), batch).backward()
        optimizer.step()
    return linear.task_vector()


def make_tasks(tie: bool, tasks: tuple[str, ...]) -> dict:
    model = CausalLM(tiny_llama(0, VOCAB, tie))
    return {
        "model": model,
        "theta0": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "vectors": {t: fine_tune(tie, i, shift=i + 1) for i, t in enumerate(tasks)},
        "inputs": {t: packed_split(i, shift=i + 1, rows=16) for i, t in enumerate(tasks)},
    }


@pytest.fixture(scope="module")
def tied() -> dict:
    return make_tasks(tie=True, tasks=TASKS)


def fast_path(data: dict, **options):
    return build_lm_fast_path(
        data["model"], data["theta0"], data["vectors"], data["inputs"], BATCH, **options
    )


def merged_delta(data: dict, coefficients: dict[str, float]) -> dict[str, torch.Tensor]:
    merged = merge("task_arithmetic", data["theta0"], data["vectors"], coefficients)
    return delta_between(merged, data["theta0"])


def real_logits(data: dict, coefficients: dict[str, float], task: str):
    packed = data["inputs"][task]
    with torch.no_grad():
        logits = linearized_forward(
            data["model"], data["theta0"], merged_delta(data, coefficients), packed
        )
    return completion_logits(logits, packed)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_a_frozen_head_has_no_delta_and_exact_zeros_in_the_task_vector(tied: dict) -> None:
    model = tied["model"]
    assert head_names(model) == {EMBED}
    assert head_names(CausalLM(tiny_llama(0, VOCAB, tie=False))) == {HEAD}
    linear = LinearizedModel(CausalLM(tiny_llama(0, VOCAB)), tied["theta0"], frozen={EMBED})
    assert EMBED not in linear.names and len(linear.names) == len(tied["theta0"]) - 1
    for vector in tied["vectors"].values():
        assert list(vector) == list(tied["theta0"])
        assert torch.equal(vector[EMBED], torch.zeros_like(vector[EMBED]))
        assert all(bool(v.any()) for k, v in vector.items() if k != EMBED)  # the body trained
    unfrozen = fine_tune(tie=True, seed=0, shift=1, frozen=False, steps=1)
    assert bool(unfrozen[EMBED].any())  # without `frozen` the same training moves the head
    with pytest.raises(ModelError, match="lm.lm_head.weight"):  # an alias, not a parameter name
        LinearizedModel(CausalLM(tiny_llama(0, VOCAB)), tied["theta0"], frozen={HEAD})


def test_fast_path_logits_equal_a_real_linearized_forward(tied: dict) -> None:
    fast = fast_path(tied)
    assert fast.vectors == TASKS and fast.tasks == list(TASKS)
    generator = torch.Generator().manual_seed(0)
    points = [{t: 0.0 for t in TASKS}, {t: 1.0 for t in TASKS}]
    points += [
        dict(zip(TASKS, (torch.rand(3, generator=generator) * 3 - 1).tolist(), strict=True))
        for _ in range(5)
    ]
    for coefficients in points:
        alpha = coefficient_vector(coefficients, fast.vectors)
        for task in TASKS:
            want, tokens = real_logits(tied, coefficients, task)
            got = fast.logits_for(alpha, task)
            assert torch.equal(fast.targets[task], tokens)
            assert got.shape == want.shape == (len(tokens), VOCAB)
            assert relative_error(got, want) <= RELATIVE
    # The directions are real: a merge moves the logits far beyond the tolerance.
    moved = fast.logits_for(torch.ones(3), "a") - fast.logits_for(torch.zeros(3), "a")
    assert float(moved.abs().max()) > 1e3 * RELATIVE * float(
        fast.logits_for(torch.ones(3), "a").abs().max()
    )


def test_token_accuracy_on_the_fast_path_equals_real_token_accuracy(tied: dict) -> None:
    fast = fast_path(tied)
    grid = [{t: round(0.4 * i, 10) for t in TASKS} for i in range(5)]
    grid += [{"a": 1.5, "b": 0.0, "c": 0.5}, {"a": 0.0, "b": 2.0, "c": -0.5}]
    coefficients = torch.stack([coefficient_vector(c, fast.vectors) for c in grid])
    matrix = fast.token_accuracy_matrix(coefficients)
    assert matrix.shape == (len(grid), len(TASKS)) and matrix.dtype == torch.float64
    real = []
    for point in grid:
        delta = merged_delta(tied, point)

        def logits_fn(batch: torch.Tensor, delta=delta) -> torch.Tensor:
            return linearized_forward(tied["model"], tied["theta0"], delta, batch)

        real.append([token_accuracy(logits_fn, tied["inputs"][t], BATCH) for t in TASKS])
    assert matrix.tolist() == real
    assert len({row[0] for row in real}) > 1  # the candidates differ: a real choice
    mean = matrix.mean(dim=1)
    assert int(mean.argmax()) == max(range(len(real)), key=lambda i: sum(real[i]) / len(TASKS))
    # Scoring in small chunks (candidates × tokens × vocab) gives the same numbers.
    small = dataclasses.replace(fast, max_elements=3 * VOCAB)
    assert torch.equal(small.token_accuracy_matrix(coefficients), matrix)
    assert torch.equal(fast.token_accuracies(coefficients)["b"], matrix[:, 1])


def test_a_vector_that_changes_the_head_is_refused(tied: dict) -> None:
    vectors = dict(tied["vectors"])
    vectors["b"] = {**vectors["b"], EMBED: torch.full_like(vectors["b"][EMBED], 1e-3)}
    with pytest.raises(MergeInputError, match="'b' changes the LM head.*frozen LM head"):
        build_lm_fast_path(tied["model"], tied["theta0"], vectors, tied["inputs"], BATCH)


@pytest.mark.parametrize(
    "coefficients",
    [
        {"a": 1.0, "b": 0.5},
        {"a": 1.0, "b": 0.5, "c": 0.2, "d": 0.5},
        {"a": 1.0, "b": 0.5, "c": math.inf},
    ],
    ids=["no-c", "unknown-d", "inf"],
)
def test_a_bad_coefficient_dict_is_refused_as_merge_refuses_it(coefficients: dict) -> None:
    # a task left out would otherwise weigh 0 in the scored merge
    assert coefficient_vector({"b": 2.0, "a": -1.0}, ("a", "b")).tolist() == [-1.0, 2.0]
    base = {"w": torch.zeros(2)}
    vectors = {task: {"w": torch.ones(2)} for task in ("a", "b", "c")}
    with pytest.raises(MergeInputError) as by_merge:
        merge("task_arithmetic", base, vectors, coefficients)
    with pytest.raises(MergeInputError) as by_fast_path:
        coefficient_vector(coefficients, ("a", "b", "c"))
    assert str(by_fast_path.value) == str(by_merge.value)


def test_an_untied_model_freezes_only_its_lm_head() -> None:
    data = make_tasks(tie=False, tasks=("a", "b"))
    for vector in data["vectors"].values():
        assert torch.equal(vector[HEAD], torch.zeros_like(vector[HEAD]))
        assert bool(vector[EMBED].any())  # the input embedding is part of the body here
    fast = fast_path(data)
    for coefficients in ({"a": 0.7, "b": -0.4}, {"a": 1.5, "b": 0.25}):
        alpha = coefficient_vector(coefficients, fast.vectors)
        for task in ("a", "b"):
            want, tokens = real_logits(data, coefficients, task)
            assert torch.equal(fast.targets[task], tokens)
            assert relative_error(fast.logits_for(alpha, task), want) <= RELATIVE


def test_logits_that_are_not_the_head_of_the_hidden_state_are_refused(tied: dict) -> None:
    class Scaled(CausalLM):
        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().forward(*inputs)

    scaled = dict(tied, model=Scaled(tied["model"].lm))
    with pytest.raises(ModelError, match="not the output head applied to the last hidden state"):
        fast_path(scaled)

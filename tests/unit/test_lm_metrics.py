"""Causal-LM loss and metrics on packed completion batches: a tiny random Llama and fake models."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.nn import functional

from storage.errors import DataError
from workers.search.lm_metrics import (
    completion_loss,
    exact_match,
    generate_greedy,
    greedy_completions,
    nll,
    normalize_answer,
    token_accuracy,
)

transformers = pytest.importorskip("transformers")

VOCAB, EOS = 50, 2


def _pack(rows: list[tuple[list[int], list[int]]], length: int) -> np.ndarray:
    """(prompt, completion) pairs as a right-padded ``(rows, 3, length)`` packed array."""
    packed = np.zeros((len(rows), 3, length), dtype=np.int64)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        packed[i, 0, :n] = prompt + completion
        packed[i, 1, :n] = 1
        packed[i, 2, len(prompt) : n] = 1
    return packed


def _trimmed(packed: torch.Tensor) -> torch.Tensor:
    assert isinstance(packed, torch.Tensor) and packed.dtype == torch.int64
    return packed[:, :, : int(packed[:, 1].sum(dim=1).max())]


def _one_hot_model(predict: Callable[[torch.Tensor], torch.Tensor]):
    """A logits_fn whose argmax at each position is ``predict(trimmed packed)``."""

    def logits_fn(packed: torch.Tensor) -> torch.Tensor:
        return functional.one_hot(predict(_trimmed(packed)), VOCAB).float()

    return logits_fn


def _next_tokens(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat([packed[:, 0, 1:], torch.zeros_like(packed[:, 0, :1])], dim=1)


@pytest.fixture(scope="module")
def llama() -> Callable[[torch.Tensor], torch.Tensor]:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,  # decisive logits: no near-ties between argmax candidates
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _llama_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    def logits_fn(packed: torch.Tensor) -> torch.Tensor:
        packed = _trimmed(packed)
        return model(input_ids=packed[:, 0], attention_mask=packed[:, 1]).logits

    return logits_fn


def _llama_rows(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shapes = [(2, 4), (5, 1), (3, 3)]  # prompt and completion lengths differ per row
    rows = [
        (rng.integers(3, VOCAB, p).tolist(), rng.integers(3, VOCAB, c).tolist()) for p, c in shapes
    ]
    return _pack(rows, length=10)


def test_completion_loss_is_the_mean_over_completion_tokens() -> None:
    packed = _pack([([5, 6, 7], [8, 9, EOS]), ([10, 11], [12])], length=8)
    torch.manual_seed(0)
    logits = torch.randn(2, 6, VOCAB, requires_grad=True)  # trimmed to the longest row
    terms = [
        -torch.log_softmax(logits[r, t], dim=0)[packed[r, 0, t + 1]]
        for r in range(2)
        for t in range(5)
        if packed[r, 2, t + 1]
    ]
    assert len(terms) == 4
    loss = completion_loss(logits, packed)
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    loss.backward()
    # Only the positions that predict completion tokens get a gradient.
    predicting = [(0, 2), (0, 3), (0, 4), (1, 1)]
    for r in range(2):
        for t in range(6):
            assert bool(logits.grad[r, t].any()) == ((r, t) in predicting), (r, t)


def test_completion_loss_weights_tokens_and_ignores_padding(llama) -> None:
    packed = torch.as_tensor(_llama_rows())
    logits_fn = _llama_fn(llama)
    alone = [completion_loss(logits_fn(packed[i : i + 1]), packed[i : i + 1]) for i in range(3)]
    tokens = [4, 1, 3]
    expected = sum(n * loss for n, loss in zip(tokens, alone, strict=True)) / sum(tokens)
    torch.testing.assert_close(completion_loss(logits_fn(packed), packed), expected)


def test_completion_loss_rejects_short_logits_and_empty_completions() -> None:
    packed = _pack([([5, 6, 7], [8, 9, EOS]), ([10, 11], [12])], length=8)
    with pytest.raises(ValueError, match="beyond the logits"):
        completion_loss(torch.zeros(2, 5, VOCAB), packed)
    with pytest.raises(DataError, match="no completion tokens"):
        completion_loss(torch.zeros(1, 3, VOCAB), _pack([([5, 6, 7], [])], length=3))


def test_token_accuracy_counts_completion_tokens_only() -> None:
    packed = _pack([([3, 4], [20, 21]), ([5, 6, 7], [22, 23, 24]), ([8], [25])], length=9)

    def right_on_completions_only(p: torch.Tensor) -> torch.Tensor:
        following = torch.cat([p[:, 2, 1:], torch.zeros_like(p[:, 2, :1])], dim=1).bool()
        return torch.where(following, _next_tokens(p), (_next_tokens(p) + 1) % VOCAB)

    def wrong_on_22_and_23(p: torch.Tensor) -> torch.Tensor:
        following = _next_tokens(p)
        wrong = (following == 22) | (following == 23)
        return torch.where(wrong, (following + 1) % VOCAB, following)

    assert token_accuracy(_one_hot_model(right_on_completions_only), packed, 3) == 1.0
    # 4 of the 6 completion tokens; per-row means would give (1 + 1/3 + 1) / 3 at batch size 1.
    for batch_size in (1, 2, 3):
        accuracy = token_accuracy(_one_hot_model(wrong_on_22_and_23), packed, batch_size)
        assert accuracy == pytest.approx(4 / 6)


def test_nll_is_per_completion_token() -> None:
    packed = _pack([([3, 4], [20, 21]), ([5, 6, 7], [22, 23, 24])], length=7)
    confident = 3.0

    def logits_fn(p: torch.Tensor) -> torch.Tensor:
        p = _trimmed(p)
        logits = torch.zeros(len(p), p.shape[2], VOCAB)
        following = torch.cat([p[:, 2, 1:], torch.zeros_like(p[:, 2, :1])], dim=1).bool()
        # confident on the completion tokens, uniform on the prompt's
        logits.scatter_(2, _next_tokens(p)[..., None], confident * following[..., None].float())
        return logits

    expected = -math.log(math.exp(confident) / (math.exp(confident) + VOCAB - 1))
    assert nll(logits_fn, packed, 1) == pytest.approx(expected, rel=1e-6)
    assert nll(lambda p: torch.zeros(len(p), 7, VOCAB), packed, 2) == pytest.approx(
        math.log(VOCAB), rel=1e-6
    )


def test_metrics_do_not_depend_on_the_batch_size(llama) -> None:
    packed = _llama_rows()
    logits_fn = _llama_fn(llama)
    with torch.no_grad():
        whole = float(completion_loss(logits_fn(torch.as_tensor(packed)), packed))
    assert nll(logits_fn, packed, 1) == pytest.approx(whole, rel=1e-5)
    assert nll(logits_fn, packed, 3) == pytest.approx(whole, rel=1e-5)
    assert token_accuracy(logits_fn, packed, 1) == token_accuracy(logits_fn, packed, 3)


def _generated_by_transformers(llama, row: np.ndarray, steps: int, eos: int) -> list[int]:
    """Greedy ``generate()`` of one packed row's prompt alone: the reference."""
    prompt = torch.as_tensor(row[0][(row[1] == 1) & (row[2] == 0)])[None]
    generated = llama.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=steps,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return generated[0, prompt.shape[1] :].tolist()


def test_greedy_generation_matches_transformers_generate(llama) -> None:
    packed = _llama_rows()
    logits_fn = _llama_fn(llama)
    steps = 6
    free = generate_greedy(logits_fn, packed, 3, steps, eos_id=None)
    assert [len(ids) for ids in free] == [steps] * 3
    eos = free[0][2]  # a token row 0 emits: it must stop there, as generate() does
    ours = generate_greedy(logits_fn, packed, 3, steps, eos_id=eos)
    assert ours == generate_greedy(logits_fn, packed, 1, steps, eos_id=eos)
    assert ours[0][-1] == eos and len(ours[0]) <= 3
    assert any(len(ids) == steps for ids in ours)
    for row, ids in zip(packed, ours, strict=True):
        assert ids == _generated_by_transformers(llama, row, steps, eos)
    decode = " ".join
    texts = greedy_completions(logits_fn, packed, 2, steps, eos, lambda ids: decode(map(str, ids)))
    assert texts == [decode(map(str, ids)) for ids in ours]


WORDS = {EOS: "</s>", 10: "Paris", 11: "paris", 13: "  Lyon", 14: "lyon", 15: " is", 16: "   IS  "}
WORDS |= {17: "nice", 18: "nicer", 3: "Q1", 4: "Q2", 5: "Q3"}


def _decode(ids: list[int]) -> str:
    return "".join(WORDS[i] for i in ids)


def _oracle(answers: dict[tuple[int, ...], list[int]]):
    """A logits_fn that continues each known prompt with its answer, then eos."""

    def predict(p: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(p.shape[0], p.shape[2], dtype=torch.int64)
        for r, row in enumerate(p):
            tokens = row[0][row[1] == 1].tolist()
            prompt = next(k for k in answers if tuple(tokens[: len(k)]) == k)
            sequence = list(prompt) + answers[prompt] + [EOS]
            for t in range(len(tokens)):
                out[r, t] = sequence[t + 1] if t + 1 < len(sequence) else EOS
        return out

    return _one_hot_model(predict)


def test_exact_match_normalises_case_whitespace_and_eos() -> None:
    # References: "Paris" (no eos), "lyon is</s>", "nice</s>".
    packed = _pack([([3], [10]), ([4, 4], [14, 15, EOS]), ([5], [17, EOS])], length=6)
    knows = _oracle({(3,): [10], (4, 4): [14, 15], (5,): [17]})
    for batch_size in (1, 3):
        assert exact_match(knows, packed, batch_size, 4, EOS, _decode) == 1.0
    # "paris</s>", "  Lyon   IS  </s>" match after normalisation; "nicer</s>" does not.
    close = _oracle({(3,): [11], (4, 4): [13, 16], (5,): [18]})
    assert greedy_completions(close, packed, 3, 4, EOS, _decode) == [
        "paris</s>",
        "  Lyon   IS  </s>",
        "nicer</s>",
    ]
    for batch_size in (1, 2, 3):
        assert exact_match(close, packed, batch_size, 4, EOS, _decode) == pytest.approx(2 / 3)
    # Cut off after one token, the second row no longer matches.
    assert exact_match(close, packed, 3, 1, EOS, _decode) == pytest.approx(1 / 3)


def test_normalize_answer() -> None:
    assert normalize_answer("  Hello \n\t World</s> ", ["</s>"]) == "hello world"
    assert normalize_answer("Hello World </s>", []) == "hello world </s>"
    assert normalize_answer("Hello", ["", "<|eot_id|>"]) == "hello"


def test_generation_needs_a_prompt() -> None:
    packed = _pack([([], [10, EOS])], length=3)
    with pytest.raises(DataError, match="empty prompt"):
        generate_greedy(_oracle({(): [10]}), packed, 1, 2, EOS)


def test_greedy_generation_with_a_kv_cache_matches_generation_without(llama) -> None:
    """The forward of a causal LM at some weights offers a KV cache: each prompt then runs once
    and each step one token per row (rows of different lengths, an eos stopping one early), and
    the tokens are those of the uncached generation and of ``generate()``."""
    from workers.models.causal_lm import CausalLM
    from workers.search.evaluate import at_state, forward_on

    model = CausalLM(llama).eval()
    packed = np.concatenate([_llama_rows(0), _llama_rows(1)])
    state = dict(model.named_parameters())
    steps = 5
    for forward in (at_state(model, state), forward_on(model, torch.device("cpu"))):
        assert forward.kv_cache
        widths: list[int] = []

        def counted(inputs, _forward=forward, _widths=widths, **cached):
            _widths.append(inputs.shape[-1])
            return _forward(inputs, **cached)

        counted.kv_cache = True
        uncached = generate_greedy(lambda p, _f=forward: _f(p), packed, 4, steps, eos_id=None)
        eos = uncached[1][1]  # row 1 stops after its second token
        expected = generate_greedy(lambda p, _f=forward: _f(p), packed, 4, steps, eos_id=eos)
        assert generate_greedy(counted, packed, 4, steps, eos_id=eos) == expected
        assert expected[1] == uncached[1][:2] and any(len(ids) == steps for ids in expected)
        assert widths.count(1) == 2 * (steps - 1) and len(widths) == 2 * steps  # 2 batches
    for row, ids in zip(packed, expected, strict=True):
        assert ids == _generated_by_transformers(llama, row, steps, eos)

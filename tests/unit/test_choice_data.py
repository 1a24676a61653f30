# ruff: noqa: E501  (a table reads best one case per line)
"""Multiple-choice data for a causal LM (issue 13): choices_column + answer_column load as
prompt / completion pairs whose completion is the right choice, encode as ``(rows, 3 * C,
length)`` with the right choice in channels 0..2, and ``choice_accuracy`` scores every choice
by its summed completion log-probability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional

from pipelines.spec.tasks import FilesDataset, HubDataset
from pipelines.stages.datasets import load_dataset
from storage.errors import DataError
from tests.lm_fixtures import tiny_llama, tiny_tokenizer
from tests.unit.test_prompt_data import EVAL, files, tokenizer, write_jsonl
from workers.data.conversations import pair_choices, prompt_messages
from workers.data.files import Columns, examples_from_table
from workers.data.prompts import encode_prompts
from workers.kinds.registry import get_kind
from workers.models.causal_lm import CausalLM
from workers.search import lm_metrics
from workers.search.lm_metrics import choice_accuracy, choice_scores

CHOICES = {"prompt_column": "q", "choices_column": "c", "answer_column": "a"}
# (prompt, choices, index of the right one): counts differ, the right one is not always first
QUESTIONS = [
    ("what is two plus two", ["a", "b"], 0),
    ("hello", ["d", "c"], 1),
    ("answer briefly", ["e", "f", "g"], 0),
    ("what is the capital of france", ["h", "paris"], 0),
    ("you are helpful", ["hello", "four"], 1),
] * 2


def choice_rows(questions=QUESTIONS, by_text: bool = False) -> list[dict]:
    return [{"q": q, "c": c, "a": c[a] if by_text else a} for q, c, a in questions]


def choice_pairs(questions=QUESTIONS) -> np.ndarray:
    table = pa.table(
        {
            "q": [q for q, _, _ in questions],
            "c": [c for _, c, _ in questions],
            "a": [a for *_, a in questions],
        }
    )
    return examples_from_table(table, Columns(prompt="q", choices="c", answer="a"), "t")[0]


# ----------------------------------------------------------------------------- loading
def test_choices_load_from_jsonl_and_csv_as_pairs_completed_by_the_right_choice(
    tmp_path: Path,
) -> None:
    jsonl = write_jsonl(tmp_path / "t.jsonl", choice_rows())
    csv = tmp_path / "t.csv"  # choices as a JSON list in a cell, the answer by its text
    cells = "".join(
        f'"{q}","{json.dumps(c).replace(chr(34), 2 * chr(34))}",{c[a]}\n' for q, c, a in QUESTIONS
    )
    csv.write_text("q,c,a\n" + cells)
    data = load_dataset(files(jsonl, **CHOICES), EVAL, "tasks[0].dataset")
    assert data.is_prompts and data.num_classes == 0 and not data.y_test.any()
    assert data.x_test[:, 1].tolist() == [c[a] for _, c, a in QUESTIONS]
    for pair, (q, c, a) in zip(data.x_test, QUESTIONS, strict=True):
        assert prompt_messages(pair) == [{"role": "user", "content": q}]
        assert pair_choices(pair) == (c, a)
    from_csv = load_dataset(files(str(csv), **CHOICES), EVAL, "t")
    assert from_csv.digest() == data.digest()
    csv_indices = tmp_path / "i.csv"  # CSV cells are text: a whole number is the index
    csv_indices.write_text("q,c,a\n" + cells.replace(",paris\n", ",1\n").replace(",four\n", ",1\n"))
    assert load_dataset(files(str(csv_indices), **CHOICES), EVAL, "t").digest() == data.digest()


def test_an_answer_text_that_looks_like_a_number_is_matched_as_text_first() -> None:
    table = pa.table({"q": ["what is two plus two"], "c": [["3", "1", "4"]], "a": ["1"]})
    pairs = examples_from_table(table, Columns(prompt="q", choices="c", answer="a"), "t")[0]
    assert pair_choices(pairs[0]) == (["3", "1", "4"], 1) and pairs[0, 1] == "1"


def test_the_huggingface_source_gives_the_same_pairs(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "t.jsonl", choice_rows())
    hub = {"source": "huggingface", "path": "json", "data_files": {"train": path, "test": path}}
    assert (
        load_dataset(hub | CHOICES, EVAL, "t").digest()
        == load_dataset(files(path, **CHOICES), EVAL, "t").digest()
    )


GOOD = {"q": "hello", "c": ["a", "b"], "a": 0}
BAD_CELLS = [
    ("index-out-of-range", [GOOD, {"q": "hello", "c": ["a", "b"], "a": 2}], "column 'a', row 1 (counting from 0) has 2, not a choice index"),
    ("negative-index", [GOOD, {"q": "hello", "c": ["a", "b"], "a": -1}], "column 'a', row 1 (counting from 0) has -1, not a choice index"),
    ("text-not-a-choice", [{**GOOD, "a": "a"}, {"q": "hello", "c": ["a", "b"], "a": "z"}], "column 'a', row 1 (counting from 0) has 'z', not one of the row's choices"),
    ("missing-answer", [GOOD, {"q": "hello", "c": ["a", "b"], "a": None}], "column 'a', row 1 (counting from 0) is missing"),
    ("answer-not-int", [{**GOOD, "a": 0.5}], "column 'a' holds double"),
    ("one-choice", [GOOD, {"q": "hello", "c": ["a"], "a": 0}], "column 'c', row 1 (counting from 0) needs a list of at least two choices"),
    ("empty-choice", [GOOD, {"q": "hello", "c": ["a", " "], "a": 0}], "column 'c', row 1 (counting from 0) choice 1 is empty"),
    ("repeated-choice", [GOOD, {"q": "hello", "c": ["a", "b", "a"], "a": 0}], "column 'c', row 1 (counting from 0) choice 2 repeats"),
    ("choices-not-a-list", [{**GOOD, "c": 3}], "column 'c' holds int64, not a list of choices"),
    ("empty-prompt", [GOOD, {**GOOD, "q": ""}], "column 'q', row 1 (counting from 0) is empty"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "fragment"), [c[1:] for c in BAD_CELLS], ids=[c[0] for c in BAD_CELLS]
)
def test_a_bad_cell_is_one_line_naming_file_row_and_column(
    tmp_path: Path, rows: list[dict], fragment: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_dataset(files(path, **CHOICES), EVAL, "tasks[0].dataset")
    message = str(caught.value)
    assert fragment in message and "bad.jsonl" in message and "\n" not in message


SPEC_REFUSALS = [
    ({"prompt_column": "q", "answer_column": "a"}, "answer_column needs choices_column"),
    ({"prompt_column": "q", "choices_column": "c"}, "choices_column needs answer_column"),
    ({"choices_column": "c", "answer_column": "a"}, "choices_column needs prompt_column"),
    (
        {"messages_column": "m", "choices_column": "c", "answer_column": "a"},
        "choices_column takes prompt_column, not messages_column",
    ),
    (
        {**CHOICES, "completion_column": "x"},
        "set completion_column or choices_column/answer_column, not both",
    ),
    ({**CHOICES, "label_column": "y"}, "label_column has no meaning"),
]


@pytest.mark.parametrize("model", [FilesDataset, HubDataset])
@pytest.mark.parametrize(("fields", "fragment"), SPEC_REFUSALS)
def test_the_spec_refuses_bad_choice_column_sets_in_one_line(
    model, fields: dict, fragment: str
) -> None:
    where = (
        {"train": "/d/a.jsonl", "test": "/d/b.jsonl"} if model is FilesDataset else {"path": "json"}
    )
    with pytest.raises(ValidationError) as caught:
        model(**where, **fields)
    assert fragment in str(caught.value)
    assert model(**where, **CHOICES).choices_column == "c"


# ----------------------------------------------------------------------------- encoding
def test_the_right_choice_packs_first_then_the_wrong_ones_after_the_same_prompt() -> None:
    tok, pairs = tokenizer(), choice_pairs()
    packed, kept = encode_prompts(pairs, tok, 16, "refuse", "t")
    assert packed.shape == (len(QUESTIONS), 9, 16) and packed.dtype == np.int64
    assert kept.tolist() == list(range(len(QUESTIONS)))
    plain = pairs.copy()  # the same rows as plain prompt / completion pairs
    plain[:, 0] = [json.dumps(prompt_messages(p)) for p in pairs]
    assert np.array_equal(packed[:, :3], encode_prompts(plain, tok, 16, "refuse", "t")[0])
    for row, (_, options, answer) in enumerate(QUESTIONS):
        wrong = [o for i, o in enumerate(options) if i != answer]
        for block, option in enumerate(wrong, start=1):
            alone = plain[row : row + 1].copy()
            alone[0, 1] = option
            assert np.array_equal(
                packed[row, 3 * block : 3 * block + 3],
                encode_prompts(alone, tok, 16, "refuse", "t")[0][0],
            )
        empty = packed[row, 3 * len(options) :].reshape(-1, 3, 16)  # fewer choices than C
        assert (empty[:, 0] == tok.pad_token_id).all() and not empty[:, 1:].any()


def test_plain_pairs_still_pack_three_channels() -> None:
    plain = np.array([[json.dumps([{"role": "user", "content": "hello"}]), "four"]], dtype=object)
    assert pair_choices(plain[0]) is None
    assert encode_prompts(plain, tokenizer(), 8, "refuse", "t")[0].shape == (1, 3, 8)


def test_the_prompt_is_cut_so_that_the_longest_choice_fits() -> None:
    pairs = choice_pairs([("what is the capital of france", ["paris", "a b c d"], 0)])
    tok = tokenizer()
    packed, _ = encode_prompts(pairs, tok, 8, "refuse", "t")  # the longest choice: 4 words + eos
    for block in range(2):
        prompt = (packed[0, 3 * block + 1] == 1) & (packed[0, 3 * block + 2] == 0)
        assert tok.decode(packed[0, 3 * block][prompt]) == "capital of france"
    dropped, kept = encode_prompts(pairs, tok, 5, "drop", "t")
    assert len(dropped) == 0 and len(kept) == 0
    with pytest.raises(DataError, match="row 0's completion is 5 tokens"):
        encode_prompts(pairs, tok, 5, "refuse", "t")


def test_a_split_mixing_choice_and_plain_rows_is_refused() -> None:
    mixed = choice_pairs(QUESTIONS[:2])
    mixed[1, 0] = json.dumps(prompt_messages(mixed[1]))
    with pytest.raises(DataError, match="row 1 .* has no choices while others have"):
        encode_prompts(mixed, tokenizer(), 16, "refuse", "t")


# ----------------------------------------------------------------------------- choice_accuracy
# Word preferences of a fake model whose logits are the same at every position, so a choice's
# score is log_softmax(w)[its word] + log_softmax(w)[eos]. Right on rows 0, 1, 4 (k = 3 of 5):
# a > b, c > d, g beats the right e, paris beats the right h, four > hello.
PREFERENCES = {
    "a": 3.0,
    "b": 1.0,
    "c": 2.0,
    "d": 0.5,
    "e": 5.0,
    "f": 1.0,
    "g": 6.0,
    "h": 0.0,
    "paris": 1.0,
    "four": 4.0,
    "hello": 0.0,
}


def fake_model(tok):
    weights = torch.zeros(len(tok))
    for word, value in PREFERENCES.items():
        weights[tok.convert_tokens_to_ids(word)] = value
    calls = []

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return weights.expand(batch.shape[0], batch.shape[2], len(weights)).clone()

    return logits_fn, functional.log_softmax(weights, dim=-1), calls


def test_choice_accuracy_counts_the_rows_whose_right_choice_scores_highest() -> None:
    tok = tokenizer()
    packed, _ = encode_prompts(choice_pairs(QUESTIONS[:5]), tok, 16, "refuse", "t")
    logits_fn, log_probs, calls = fake_model(tok)
    scores = choice_scores(logits_fn, packed, 4)
    eos = float(log_probs[tok.eos_token_id])
    word = {w: float(log_probs[tok.convert_tokens_to_ids(w)]) + eos for w in PREFERENCES}
    inf = float("-inf")
    expected = [
        [word["a"], word["b"], inf],
        [word["c"], word["d"], inf],
        [word["e"], word["f"], word["g"]],
        [word["h"], word["paris"], inf],
        [word["four"], word["hello"], inf],
    ]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-6)
    assert calls == [4, 4, 3]  # 11 real choices, four at a time; padding is never run
    assert choice_accuracy(logits_fn, packed, 4) == pytest.approx(3 / 5)
    assert choice_accuracy(logits_fn, packed[[0, 1, 4]], 4) == 1.0
    assert choice_accuracy(logits_fn, packed[[2, 3]], 4) == 0.0


def test_a_tie_counts_as_wrong() -> None:
    tok = tokenizer()
    packed, _ = encode_prompts(choice_pairs(QUESTIONS[:1]), tok, 16, "refuse", "t")
    flat = lambda batch: torch.zeros(batch.shape[0], batch.shape[2], len(tok))  # noqa: E731
    assert choice_accuracy(flat, packed, 2) == 0.0


def test_the_batch_size_does_not_change_the_scores() -> None:
    tok = tokenizer()
    packed, _ = encode_prompts(choice_pairs(), tok, 16, "refuse", "t")
    logits_fn, _, _ = fake_model(tok)
    one, three = choice_scores(logits_fn, packed, 1), choice_scores(logits_fn, packed, 3)
    assert torch.equal(one, three)
    assert (
        choice_accuracy(logits_fn, packed, 1)
        == choice_accuracy(logits_fn, packed, 3)
        == pytest.approx(3 / 5)
    )


def test_plain_prompt_completion_rows_have_no_choices_to_score() -> None:
    plain = np.array([[json.dumps([{"role": "user", "content": "hello"}]), "four"]], dtype=object)
    packed, _ = encode_prompts(plain, tokenizer(), 8, "refuse", "t")
    logits_fn, _, _ = fake_model(tokenizer())
    with pytest.raises(DataError, match="^choice_accuracy needs choices_column and answer_column"):
        choice_accuracy(logits_fn, packed, 2)
    with pytest.raises(DataError, match="choice_accuracy needs choices_column and answer_column"):
        get_kind("causal_lm").score(
            logits_fn, {}, packed, np.zeros(1, np.int64), "choice_accuracy", {}
        )


# ----------------------------------------------------------------------------- a real model
LLAMA_QUESTIONS = [
    ("what is the capital of france ?", ["paris", "rome", "madrid"], 0),
    ("what is two plus two ?", ["three", "four"], 1),
    ("one plus one equals", ["ten", "nine", "two", "one"], 2),
    ("what is the capital of italy ?", ["berlin rome", "rome"], 1),
    ("five minus three equals", ["two .", "eight", "seven"], 0),
]


def manual_scores(model, tok, question: str, options: list[str]) -> list[float]:
    """Each choice's summed log-probability, from one unpadded forward pass per choice."""
    prompt = tok(f"<|user|> {question} <|assistant|>", add_special_tokens=False)["input_ids"]
    scores = []
    for option in options:
        ids = prompt + tok(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = functional.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        scores.append(sum(float(log_probs[t - 1, ids[t]]) for t in range(len(prompt), len(ids))))
    return scores


def test_with_a_tiny_llama_choice_accuracy_is_the_per_row_computation() -> None:
    tok, lm = tiny_tokenizer(), tiny_llama(seed=3)
    packed, _ = encode_prompts(choice_pairs(LLAMA_QUESTIONS), tok, 24, "refuse", "t")
    assert packed.shape == (5, 12, 24)
    forward = CausalLM(lm).eval()
    right = 0
    for row, (question, options, answer) in enumerate(LLAMA_QUESTIONS):
        manual = manual_scores(lm, tok, question, options)
        ordered = [manual[answer]] + [s for i, s in enumerate(manual) if i != answer]
        got = choice_scores(forward, packed[row : row + 1], 8)[0]
        assert torch.allclose(got[: len(options)], torch.tensor(ordered), atol=1e-4)
        assert torch.isinf(got[len(options) :]).all()
        right += int(np.argmax(manual) == answer)
    accuracy = choice_accuracy(forward, packed, 3)
    assert accuracy == pytest.approx(right / len(LLAMA_QUESTIONS))
    assert choice_accuracy(forward, packed, 1) == accuracy
    kind = get_kind("causal_lm")
    y = np.zeros(len(packed), np.int64)
    assert kind.score(forward, {}, packed, y, "choice_accuracy", {"batch_size": 2}) == accuracy


def test_training_and_the_other_metrics_read_the_right_choice_only() -> None:
    tok, lm = tiny_tokenizer(), tiny_llama(seed=3)
    packed, _ = encode_prompts(choice_pairs(LLAMA_QUESTIONS), tok, 24, "refuse", "t")
    forward, right = CausalLM(lm).eval(), packed[:, :3]
    with torch.no_grad():
        logits = forward(torch.as_tensor(packed))
        assert torch.equal(logits, forward(torch.as_tensor(right)))
        kind = get_kind("causal_lm")
        y = torch.zeros(len(packed))
        assert torch.equal(
            kind.loss(logits, torch.as_tensor(packed), y),
            kind.loss(logits, torch.as_tensor(right), y),
        )
    assert lm_metrics.token_accuracy(forward, packed, 2) == lm_metrics.token_accuracy(
        forward, right, 2
    )
    assert lm_metrics.nll(forward, packed, 2) == lm_metrics.nll(forward, right, 2)

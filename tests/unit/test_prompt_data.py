# ruff: noqa: E501  (a table reads best one case per line)
"""Instruction data for a causal LM: prompt / completion and messages columns load as pairs,
render through the chat template (or none), and tokenize with a completion mask that marks
exactly the answer; prompts too long lose their start, completions are never cut."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.spec.load import validate_document
from pipelines.stages.datasets import load_dataset
from storage.digest import digest_arrays
from storage.errors import DataError, SpecError
from tests.conftest import TINY_SPEC
from workers.data.prompts import (
    COMPLETION,
    IDS,
    MASK,
    completion_ids,
    encode_prompts,
    encode_splits,
    prompt_ids,
    render,
)

EVAL = {"val_fraction": 0.25, "val_max": 5000, "split_seed": 0}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Another template over the same tokens: the same rows must render (and digest) differently.
BRACKETS = (
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)
WORDS = (
    "what is the capital of france paris two plus two four you are helpful answer briefly "
    "hello a b c d e f g h user assistant system 4"
).split()
SPECIAL = ["<pad>", "<unk>", "<eos>", "<s>", "<|im_start|>", "<|im_end|>"]
ROWS = [
    ("what is the capital of france", "paris"),
    ("what is two plus two", "four"),
    ("hello", "hello you are helpful"),
    ("answer briefly what is two plus two", "4"),
] * 3


def tokenizer(chat_template: str | None = None, pad: bool = True, bos: bool = False):
    """A word-level tokenizer over :data:`WORDS`, built here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"eos_token": "<eos>", "unk_token": "<unk>"}
    special |= {"pad_token": "<pad>"} if pad else {}
    special |= {"bos_token": "<s>"} if bos else {}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=core, additional_special_tokens=["<|im_start|>", "<|im_end|>"], **special
    )
    if chat_template:
        wrapped.chat_template = chat_template
    return wrapped


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def prompt_rows(rows=ROWS) -> list[dict]:
    return [{"prompt": p, "completion": c} for p, c in rows]


def message_rows(rows=ROWS) -> list[dict]:
    system = {"role": "system", "content": "you are helpful"}
    return [
        {"messages": [system, {"role": "user", "content": p}, {"role": "assistant", "content": c}]}
        for p, c in rows
    ]


def files(path: str, **columns: str) -> dict:
    return {"source": "files", "train": path, "test": path, **columns}


PROMPTS = {"prompt_column": "prompt", "completion_column": "completion"}
LM_BASE = {"source": "hf", "kind": "causal_lm", "model": "/nonexistent/model"}
MESSAGES = {"messages_column": "messages"}


def pairs(*rows: tuple[list[dict], str]) -> np.ndarray:
    out = np.empty((len(rows), 2), dtype=object)
    for index, (messages, answer) in enumerate(rows):
        out[index] = [json.dumps(messages), answer]
    return out


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- loading
def test_prompt_completion_files_load_as_pairs_whatever_the_format(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "t.jsonl", prompt_rows())
    csv = tmp_path / "t.csv"
    csv.write_text("prompt,completion\n" + "".join(f'"{p}",{c}\n' for p, c in ROWS))
    data = load_dataset(files(jsonl, **PROMPTS), EVAL, "tasks[0].dataset")
    assert data.is_prompts and data.is_text and data.input_dim == 0
    assert data.num_classes == 0 and data.x_test.shape == (len(ROWS), 2)
    assert data.y_train.dtype == np.int64 and not data.y_train.any()
    assert json.loads(data.x_test[0, 0]) == [{"role": "user", "content": ROWS[0][0]}]
    assert data.x_test[:, 1].tolist() == [c for _, c in ROWS]
    assert len(data.y_val) == len(ROWS) // 4 and len(data.y_train) == len(ROWS) - len(data.y_val)
    from_csv = load_dataset(files(str(csv), **PROMPTS), EVAL, "t")
    assert from_csv.x_test[3, 1] == "4"  # an answer that looks like a number stays text
    assert from_csv.digest() == data.digest()
    assert load_dataset(files(jsonl, **PROMPTS), EVAL, "t").digest() == data.digest()


def test_the_validation_rows_are_held_out_of_train(tmp_path: Path) -> None:
    rows = [(f"what is {w}", w) for w in "a b c d e f g h".split()]
    path = write_jsonl(tmp_path / "t.jsonl", prompt_rows(rows))
    data = load_dataset(files(path, **PROMPTS), EVAL | {"val_fraction": 0.25}, "t")
    train, val = set(data.x_train[:, 1]), set(data.x_val[:, 1])
    assert len(val) == 2 and not train & val and train | val == set("abcdefgh")


def test_messages_load_with_the_last_message_as_the_completion(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "m.jsonl", message_rows())
    data = load_dataset(files(jsonl, **MESSAGES), EVAL, "t")
    prompt = json.loads(data.x_test[0, 0])
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert prompt[1]["content"] == ROWS[0][0] and data.x_test[0, 1] == ROWS[0][1]
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(message_rows()), parquet)
    csv = tmp_path / "m.csv"  # in CSV, a conversation is its JSON in one cell
    cells = [json.dumps(row["messages"]).replace('"', '""') for row in message_rows()]
    csv.write_text("messages\n" + "".join(f'"{cell}"\n' for cell in cells))
    for other in (parquet, csv):
        assert load_dataset(files(str(other), **MESSAGES), EVAL, "t").digest() == data.digest()


def test_the_huggingface_source_gives_the_same_pairs(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "t.jsonl", prompt_rows())
    hub = {"source": "huggingface", "path": "json", "data_files": {"train": path, "test": path}}
    from_hub = load_dataset(hub | PROMPTS, EVAL, "t")
    assert from_hub.digest() == load_dataset(files(path, **PROMPTS), EVAL, "t").digest()


GOOD = {"prompt": "hello", "completion": "four"}
TALK = {"messages": [*user("hello"), {"role": "assistant", "content": "four"}]}
BAD_CELLS = [
    ("missing-completion", PROMPTS, [GOOD, {"prompt": "hello", "completion": None}], "column 'completion', row 1"),
    ("empty-prompt", PROMPTS, [GOOD, {"prompt": " ", "completion": "b"}], "column 'prompt', row 1 (counting from 0) is empty"),
    ("number-completion", PROMPTS, [{"prompt": "a", "completion": 4}], "column 'completion' holds int64, not strings"),
    ("no-such-column", {"prompt_column": "question", "completion_column": "completion"}, [GOOD], "no column 'question'"),
    ("one-message", MESSAGES, [TALK, {"messages": user("a")}], "column 'messages', row 1"),
    ("ends-with-user", MESSAGES, [TALK, {"messages": user("a") * 2}], "the last message must be the assistant's answer"),
    ("empty-answer", MESSAGES, [TALK, {"messages": [*user("a"), {"role": "assistant", "content": ""}]}], "empty answer"),
    ("missing-messages", MESSAGES, [TALK, {"messages": None}], "column 'messages', row 1 (counting from 0) is missing"),
    ("content-not-text", MESSAGES, [{"messages": [*user("a"), {"role": "assistant"}]}], "message 1 is not a {role, content} pair"),
    ("messages-not-a-list", MESSAGES, [{"messages": 3}], "column 'messages' holds int64, not a list"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("columns", "rows", "fragment"), [c[1:] for c in BAD_CELLS], ids=[c[0] for c in BAD_CELLS]
)
def test_a_bad_cell_is_one_line_naming_file_row_and_column(
    tmp_path: Path, columns: dict, rows: list[dict], fragment: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_dataset(files(path, **columns), EVAL, "tasks[0].dataset")
    message = str(caught.value)
    assert fragment in message and "bad.jsonl" in message and "\n" not in message


# ----------------------------------------------------------------------------- rendering
def test_the_completion_mask_covers_exactly_the_answer_and_the_end_of_turn() -> None:
    tok = tokenizer(CHATML)
    data = pairs(
        (user("what is two plus two"), "four"),
        ([{"role": "system", "content": "answer briefly"}, *user("hello")], "hello a b"),
    )
    packed, kept = encode_prompts(data, tok, 24, "refuse", "t")
    assert packed.shape == (2, 3, 24) and packed.dtype == np.int64 and kept.tolist() == [0, 1]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert completion_ids(packed) == [ids_of(tok, "four") + [end], ids_of(tok, "hello a b") + [end]]
    prompt_text, completion_text = render(data[0], tok, "t", 0)
    assert prompt_text == tok.apply_chat_template(
        user("what is two plus two"), add_generation_prompt=True, tokenize=False
    )
    assert completion_text == "four<|im_end|>\n"
    assert prompt_ids(packed)[0] == ids_of(tok, prompt_text)
    for row in packed:  # prompt, then completion, then padding: nothing else
        length = int(row[MASK].sum())
        assert row[MASK, :length].all() and not row[MASK, length:].any()
        assert (row[IDS, length:] == tok.pad_token_id).all()
        assert not row[COMPLETION, length:].any() and row[COMPLETION, length - 1] == 1


def test_without_a_chat_template_the_contents_join_and_eos_ends_the_answer() -> None:
    tok = tokenizer(pad=False, bos=True)  # no pad: eos pads; a BOS of its own leads
    data = pairs(([{"role": "system", "content": "answer briefly"}, *user("hello")], "four"))
    prompt_text, completion_text = render(data[0], tok, "t", 0)
    assert (prompt_text, completion_text) == ("answer briefly\nhello\n", "four")
    packed, _ = encode_prompts(data, tok, 10, "refuse", "t")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert prompt_ids(packed) == [[bos, *ids_of(tok, "answer briefly hello")]]
    assert completion_ids(packed) == [[*ids_of(tok, "four"), eos]]
    assert (packed[0, IDS, 6:] == eos).all() and not packed[0, MASK, 6:].any()


def test_a_long_prompt_loses_its_start_and_the_completion_stays_whole() -> None:
    tok = tokenizer()
    data = pairs((user("a b c d e f g h"), "paris"))
    packed, kept = encode_prompts(data, tok, 5, "refuse", "t")
    assert kept.tolist() == [0] and packed[0, MASK].all()
    assert prompt_ids(packed) == [ids_of(tok, "f g h")]  # "\n" is not a word: 8 + 2 tokens
    assert completion_ids(packed) == [[*ids_of(tok, "paris"), tok.eos_token_id]]
    with_bos, _ = encode_prompts(data, tokenizer(bos=True), 5, "refuse", "t")
    assert prompt_ids(with_bos) == [[tokenizer(bos=True).bos_token_id, *ids_of(tok, "g h")]]


def test_a_completion_that_cannot_fit_is_refused_or_dropped_and_counted() -> None:
    tok = tokenizer()
    data = pairs(
        (user("hello"), "paris"),
        (user("hello"), "a b c d e"),  # 5 words + eos: no room for a prompt token in 6
        (user("what is the capital of france"), "paris"),
    )
    with pytest.raises(DataError) as caught:
        encode_prompts(data, tok, 6, "refuse", "tasks[0].dataset")
    assert str(caught.value) == (
        "tasks[0].dataset: row 1's completion is 6 tokens, more than max_length 6 allows: "
        "raise base_model.max_length or set dataset.overflow: drop"
    )
    packed, kept = encode_prompts(data, tok, 6, "drop", "t")
    assert kept.dtype == np.int64 and kept.tolist() == [0, 2] and len(packed) == 2
    assert completion_ids(packed)[1] == [*ids_of(tok, "paris"), tok.eos_token_id]
    assert prompt_ids(packed)[1] == ids_of(tok, "the capital of france")
    assert len(encode_prompts(data, tok, 7, "refuse", "t")[1]) == 3  # one prompt token is enough


def test_a_template_that_does_not_extend_its_prompt_is_refused() -> None:
    broken = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    broken += "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    with pytest.raises(DataError, match="row 0 .* does not render the conversation"):
        encode_prompts(pairs((user("hello"), "four")), tokenizer(broken), 16, "refuse", "t")
    raising = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="cannot render it .*roles must alternate"):
        encode_prompts(pairs((user("hello"), "four")), tokenizer(raising), 16, "refuse", "t")


def test_the_digest_covers_the_rendering(tmp_path: Path) -> None:
    data = pairs(*[(user(p), c) for p, c in ROWS])
    chatml, _ = encode_prompts(data, tokenizer(CHATML), 32, "refuse", "t")
    brackets, _ = encode_prompts(data, tokenizer(BRACKETS), 32, "refuse", "t")
    again, _ = encode_prompts(data, tokenizer(CHATML), 32, "refuse", "t")
    assert digest_arrays({"x": chatml}) != digest_arrays({"x": brackets})
    assert digest_arrays({"x": chatml}) == digest_arrays({"x": again})
    path = write_jsonl(tmp_path / "t.jsonl", prompt_rows())
    raw = load_dataset(files(path, **PROMPTS), EVAL, "t")
    encoded = {
        name: encode_splits(raw, tokenizer(template), 32, "refuse", "t")
        for name, template in (("chatml", CHATML), ("brackets", BRACKETS), ("again", CHATML))
    }
    assert encoded["chatml"][0].digest() != encoded["brackets"][0].digest()
    assert encoded["chatml"][0].digest() == encoded["again"][0].digest()
    assert encoded["chatml"][0].digest() != raw.digest()
    splits, dropped = encoded["chatml"]
    assert dropped == 0 and splits.x_train.shape[1:] == (3, 32) and splits.num_classes == 0


def test_encoding_splits_needs_pairs_and_a_row_left_in_every_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", prompt_rows())
    raw = load_dataset(files(path, **PROMPTS), EVAL, "t")
    with pytest.raises(DataError, match="raise base_model.max_length"):
        encode_splits(raw, tokenizer(), 2, "drop", "t")
    text = tmp_path / "text.jsonl"
    write_jsonl(text, [{"text": p, "label": i % 2} for i, (p, _) in enumerate(ROWS)])
    classified = load_dataset(files(str(text), text_column="text"), EVAL, "t")
    assert classified.is_text and not classified.is_prompts
    with pytest.raises(DataError, match="set prompt_column and completion_column"):
        encode_splits(classified, tokenizer(), 16, "refuse", "t")


# ----------------------------------------------------------------------------- spec
SPEC_REFUSALS = [
    ({"prompt_column": "p"}, "prompt_column needs completion_column"),
    ({"completion_column": "c"}, "completion_column needs prompt_column"),
    ({**PROMPTS, "messages_column": "m"}, "set messages_column or prompt_column/completion_column"),
    ({**PROMPTS, "text_column": "t"}, "set text_column or prompt_column/messages_column"),
    ({**MESSAGES, "features_column": "x"}, "set features_column or prompt_column/messages_column"),
    ({**PROMPTS, "label_column": "y"}, "label_column has no meaning"),
    ({**MESSAGES, "num_classes": 3}, "num_classes has no meaning"),
    ({"text_column": "t", "overflow": "drop"}, "overflow applies to prompt_column/messages_column"),
    ({**PROMPTS, "overflow": "truncate"}, "overflow"),
]


@pytest.mark.parametrize(("fields", "fragment"), SPEC_REFUSALS)
@pytest.mark.parametrize("source", ["files", "huggingface"])
def test_the_spec_refuses_bad_column_sets_in_one_line(
    source: str, fields: dict, fragment: str
) -> None:
    document = copy.deepcopy(TINY_SPEC)
    document["base_model"] = LM_BASE
    where = {"train": "/d/a.jsonl", "test": "/d/b.jsonl"} if source == "files" else {"path": "json"}
    for task in document["tasks"]:
        task["dataset"] = {"source": source, **where, **fields}
    with pytest.raises(SpecError) as caught:
        validate_document(document)
    message = str(caught.value)
    assert fragment in message and "tasks[0].dataset" in message and "\n" not in message


def test_the_spec_accepts_prompt_and_messages_datasets() -> None:
    document = copy.deepcopy(TINY_SPEC)
    document["base_model"] = LM_BASE
    where = {"source": "files", "train": "/d/a.jsonl", "test": "/d/b.jsonl"}
    document["tasks"][0]["dataset"] = where | PROMPTS | {"overflow": "drop"}
    document["tasks"][1]["dataset"] = {"source": "huggingface", "path": "json"} | MESSAGES
    spec = validate_document(document)
    assert spec.tasks[0].dataset.overflow == "drop"
    assert spec.tasks[1].dataset.messages_column == "messages"
    assert spec.tasks[1].dataset.overflow == "refuse"
    document["base_model"] = TINY_SPEC["base_model"]  # the MLP classifies
    with pytest.raises(SpecError, match=r"dataset\.prompt_column needs base_model\.kind: causal"):
        validate_document(document)


def test_the_cache_keys_digest_the_rendered_tokens(tmp_path: Path) -> None:
    from pipelines.run.fingerprint import fingerprint_datasets, key_digests
    from pipelines.spec.plan import make_plan

    data = write_jsonl(tmp_path / "t.jsonl", prompt_rows())

    def digests(template: str, max_length: int = 32) -> tuple[dict[str, str], dict[str, str]]:
        model = tmp_path / f"model-{len(list(tmp_path.glob('model-*')))}"
        tokenizer(template).save_pretrained(str(model))
        (model / "config.json").write_text("{}")  # a model directory; the weights never load
        document = copy.deepcopy(TINY_SPEC)
        document["base_model"] = LM_BASE | {"model": str(model), "max_length": max_length}
        for task in document["tasks"]:
            task["dataset"] = files(data, **PROMPTS)
        plan = make_plan(validate_document(document))
        datasets = fingerprint_datasets(plan)
        return key_digests(plan, datasets), {n: d.digest() for n, d in datasets.items()}

    chatml, raw = digests(CHATML)
    assert digests(CHATML) == (chatml, raw)  # stable across runs
    other, same_raw = digests(BRACKETS)
    assert same_raw == raw and other["perm1"] != chatml["perm1"]  # same rows, same weights
    assert digests(CHATML, max_length=8)[0]["perm1"] != chatml["perm1"]
    assert chatml["perm1"] != raw["perm1"]


def test_the_causal_lm_base_encodes_the_splits_and_drops_the_rows_labels_too(
    tmp_path: Path,
) -> None:
    from pipelines.stages.base import Base
    from workers.kinds import get_kind

    rows = [*ROWS, ("hello", "a b c d e f g h")]  # this completion cannot fit in 8 tokens
    path = write_jsonl(tmp_path / "t.jsonl", prompt_rows(rows))
    raw = load_dataset(files(path, **PROMPTS), EVAL, "tasks[0].dataset")
    base = Base(None, {}, get_kind("causal_lm"), tokenizer(CHATML), 8)
    with pytest.raises(DataError, match="completion is 9 tokens, more than max_length 8"):
        base.inputs(raw, "tasks[0].dataset", {"overflow": "refuse"})
    encoded = base.inputs(raw, "tasks[0].dataset", {"overflow": "drop"})
    assert encoded.x_test.shape == (len(ROWS), 3, 8) and len(encoded.y_test) == len(ROWS)
    assert encoded.digest() == encode_splits(raw, tokenizer(CHATML), 8, "drop", "t")[0].digest()

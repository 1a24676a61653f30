"""Prompt / completion pairs for a causal language model, read from a table's columns.

Either a prompt column and a completion column (one user turn and its answer), or a messages
column: a chat conversation, a list of ``{role, content}`` whose last message is the
assistant's answer (in CSV, the list as a JSON string). Each row becomes a pair: the prompt's
messages as a JSON string and the completion text, so the rows hash and split like any other
text; the base model's tokenizer renders them later (:mod:`workers.data.prompts`).

Multiple-choice data names a prompt column, a choices column (a list of strings per row; in
CSV, a JSON list) and an answer column (the right choice's index from 0, or its text). Such a
row becomes the same pair, whose completion is the right choice's text, so training and the
completion metrics read it unchanged; its first cell is then the JSON object
``{"messages": [...], "choices": [...], "answer": index}`` instead of the bare messages list,
which keeps every other dataset's pairs, and their digests, as they were.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import numpy as np

from storage.errors import DataError
from workers.data.text_encoding import decode_rows

ANSWER_ROLE = "assistant"


def pairs_from_table(table, columns: Any, where: str) -> np.ndarray:
    """An object array ``(rows, 2)``: the prompt's messages as JSON (with the choices, for
    multiple-choice rows), then the completion. ``columns`` is a
    :class:`workers.data.files.Columns`."""
    encoding = columns.encoding
    if columns.messages is not None:
        conversations = _messages(table.column(columns.messages), columns.messages, encoding, where)
        return _pairs([(c[:-1], c[-1]["content"]) for c in conversations])
    prompts = _strings(table.column(columns.prompt), columns.prompt, encoding, where)
    if columns.choices is not None:
        choices = _choice_lists(table.column(columns.choices), columns.choices, encoding, where)
        answers = _answers(table.column(columns.answer), columns.answer, choices, encoding, where)
        return _choice_pairs(prompts, choices, answers)
    answers = _strings(table.column(columns.completion), columns.completion, encoding, where)
    return _pairs([([_message("user", p)], a) for p, a in zip(prompts, answers, strict=True)])


def prompt_messages(pair: np.ndarray) -> list[dict[str, str]]:
    """The prompt's messages of one pair (a row of :func:`pairs_from_table`'s array)."""
    prompt = json.loads(pair[0])
    return prompt["messages"] if isinstance(prompt, dict) else prompt


def pair_choices(pair: np.ndarray) -> tuple[list[str], int] | None:
    """A multiple-choice pair's choices and the right one's index; None for other pairs."""
    prompt = json.loads(pair[0])
    if not isinstance(prompt, dict):
        return None
    return prompt["choices"], int(prompt["answer"])


def _choice_pairs(prompts: list[str], choices: list[list[str]], answers: list[int]) -> np.ndarray:
    pairs = np.empty((len(prompts), 2), dtype=object)
    for index, (prompt, options, answer) in enumerate(zip(prompts, choices, answers, strict=True)):
        cell = {"messages": [_message("user", prompt)], "choices": options, "answer": answer}
        pairs[index, 0] = json.dumps(cell, ensure_ascii=False)
        pairs[index, 1] = options[answer]
    return pairs


def _list_cells(column, name: str, encoding: str, where: str, what: str) -> list[Any]:
    """A column of lists, one per row: JSON strings in CSV, list-typed elsewhere."""
    import pyarrow as pa

    cells = _cells(column, name, encoding, where)
    if cells is not None:  # CSV: each cell is the list as a JSON string
        parsed = []
        for row, text in enumerate(cells):
            try:
                parsed.append(None if text is None else json.loads(text))
            except json.JSONDecodeError as error:
                _refuse(where, name, row, f"is not a JSON list of {what} ({error.msg})")
        return parsed
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.to_pylist()
    raise DataError(f"{where}: column {name!r} holds {column.type}, not a list of {what}")


def _choice_lists(column, name: str, encoding: str, where: str) -> list[list[str]]:
    """Each row's choices: a list of at least two non-empty strings."""
    cells = _list_cells(column, name, encoding, where, "choices")
    for row, value in enumerate(cells):
        if not isinstance(value, list) or len(value) < 2:
            _refuse(where, name, row, "needs a list of at least two choices (strings)")
        for index, choice in enumerate(value):
            if not isinstance(choice, str) or not choice.strip():
                _refuse(where, name, row, f"choice {index} is empty or not a string")
            if choice in value[:index]:
                _refuse(where, name, row, f"choice {index} repeats an earlier choice")
    return cells


def _answers(column, name: str, choices: list[list[str]], encoding: str, where: str) -> list[int]:
    """Each row's right choice as an index. A string names the choice by its text; one that
    matches no choice but is a whole number is the index (CSV cells are all text)."""
    import pyarrow as pa

    cells = _cells(column, name, encoding, where)
    if cells is None:
        if not pa.types.is_integer(column.type):
            raise DataError(
                f"{where}: column {name!r} holds {column.type}: give each row's right choice "
                "as its index (an integer from 0) or its text"
            )
        cells = column.to_pylist()
    answers = []
    for row, (value, options) in enumerate(zip(cells, choices, strict=True)):
        if value is None:
            _refuse(where, name, row, "is missing: every row needs its right choice")
        if isinstance(value, str):
            if value in options:
                answers.append(options.index(value))
                continue
            if not value.strip().isdigit():
                _refuse(where, name, row, f"has {value[:80]!r}, not one of the row's choices")
            value = int(value.strip())
        if not 0 <= value < len(options):
            _refuse(
                where,
                name,
                row,
                f"has {value}, not a choice index: the row has {len(options)} choices "
                f"(0..{len(options) - 1})",
            )
        answers.append(value)
    return answers


def _pairs(rows: list[tuple[list[dict[str, str]], str]]) -> np.ndarray:
    pairs = np.empty((len(rows), 2), dtype=object)
    for index, (prompt, answer) in enumerate(rows):
        pairs[index, 0] = json.dumps(prompt, ensure_ascii=False)
        pairs[index, 1] = answer
    return pairs


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _cells(column, name: str, encoding: str, where: str) -> list[Any] | None:
    """The column's cells as Python values; strings decoded; None if it holds no text."""
    import pyarrow as pa

    column = column.combine_chunks()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            return column.to_pylist()
        except UnicodeDecodeError:  # a writer stored invalid UTF-8 as strings: find the row
            column = column.cast(pa.large_binary())
            kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return decode_rows(column.to_pylist(), encoding, f"{where}: column {name!r}")
    return None


def _strings(column, name: str, encoding: str, where: str) -> list[str]:
    cells = _cells(column, name, encoding, where)
    if cells is None:
        raise DataError(
            f"{where}: column {name!r} holds {column.type}, not strings: store the prompts "
            "and completions as text (quote them in JSONL)"
        )
    for row, value in enumerate(cells):
        if value is None:
            _refuse(where, name, row, "is missing: every row needs a prompt and a completion")
        if not value.strip():
            _refuse(where, name, row, "is empty: every row needs a prompt and a completion")
    return cells


def _messages(column, name: str, encoding: str, where: str) -> list[list[dict[str, str]]]:

    cells = _list_cells(column, name, encoding, where, "{role, content} messages")
    return [_conversation(value, name, row, where) for row, value in enumerate(cells)]


def _conversation(value: Any, name: str, row: int, where: str) -> list[dict[str, str]]:
    if value is None:
        _refuse(where, name, row, "is missing: every row needs a conversation")
    if not isinstance(value, list) or len(value) < 2:
        _refuse(
            where,
            name,
            row,
            "needs a list of at least two {role, content} messages: the prompt, then the "
            "assistant's answer",
        )
    messages = []
    for index, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            _refuse(
                where,
                name,
                row,
                f"message {index} is not a {{role, content}} pair of strings",
            )
        messages.append(_message(role, content))
    if messages[-1]["role"] != ANSWER_ROLE:
        _refuse(
            where,
            name,
            row,
            f"ends with a {messages[-1]['role']!r} message: the last message must be the "
            f"{ANSWER_ROLE}'s answer",
        )
    if not messages[-1]["content"].strip():
        _refuse(where, name, row, "has an empty answer (its last message)")
    return messages


def _refuse(where: str, name: str, row: int, problem: str) -> NoReturn:
    raise DataError(f"{where}: column {name!r}, row {row} (counting from 0) {problem}")

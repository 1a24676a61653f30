"""Prompt / completion pairs rendered and tokenized for a causal language model.

A pair (the prompt's messages as JSON, the completion text; :mod:`workers.data.conversations`)
becomes one right-padded row of three channels: token ids, attention mask, and the completion
mask, 1 exactly on the completion's tokens, the training targets. With a chat template the
prompt is the template's rendering of the messages with the generation prompt, and the
completion is what the template adds for the assistant's answer (its end-of-turn included);
without one the prompt is the contents joined by newlines, after the tokenizer's BOS where it
has its own (``bos != eos``), and the completion is the answer then EOS. A prompt too long for
``max_length`` loses its start (a leading BOS is kept); a completion that cannot fit with at
least one prompt token is refused, or dropped and counted with ``overflow: drop``, never cut.

Multiple-choice pairs (:func:`workers.data.conversations.pair_choices`) pack each choice as
three more channels after the same prompt: ``(rows, 3 * C, max_length)`` where channels 0..2
are the right choice (exactly what every other consumer reads: training, token_accuracy,
exact_match, the fast path) and each further block of three a wrong choice, in the row's order;
C is the split's largest number of choices, and a row with fewer has empty blocks after its
own (pad ids, no attention, no completion). The prompt is cut once so that the longest choice
fits, so every choice follows the same prompt tokens.
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np

from storage.errors import DataError
from workers.data.conversations import ANSWER_ROLE, pair_choices, prompt_messages
from workers.data.splits import Splits

OVERFLOW = ("refuse", "drop")
IDS, MASK, COMPLETION = 0, 1, 2  # the channels of a packed row


def encode_prompts(
    pairs: np.ndarray, tokenizer: Any, max_length: int, overflow: str, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(rows, 2)`` -> int64 ``(rows_kept, 3, max_length)`` (ids, attention mask,
    completion mask), or ``(rows_kept, 3 * C, max_length)`` for multiple-choice pairs (see the
    module docstring), and the kept rows' indices (int64): ``overflow: drop`` leaves out
    ``rows - len(kept)`` rows, whose labels the caller drops with ``y[kept]``."""
    if overflow not in OVERFLOW:
        raise DataError(f"{what}.overflow: unknown {overflow!r}; known: {list(OVERFLOW)}")
    pad = _pad_id(tokenizer, what)
    texts = [render(pair, tokenizer, what, row) for row, pair in enumerate(pairs)]
    prompts = _token_ids(tokenizer, [prompt for prompt, _ in texts])
    answers = _answer_texts(pairs, texts, tokenizer, what)
    completions = _regroup(_token_ids(tokenizer, [a for row in answers for a in row]), answers)
    if not _chat_template(tokenizer):
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if bos is not None and bos != eos:
            prompts = [[bos, *ids] for ids in prompts]
        completions = [[[*ids, eos] for ids in row] for row in completions]
    width = max((len(row) for row in completions), default=1)
    packed = np.zeros((len(texts), 3 * width, max_length), dtype=np.int64)
    packed[:, IDS::3] = pad
    kept: list[int] = []
    for row, (prompt, choices) in enumerate(zip(prompts, completions, strict=True)):
        longest = max(choices, key=len)
        room = max_length - len(longest)
        if room < 1 or not prompt:
            if overflow == "drop" and prompt:
                continue
            _refuse(what, row, prompt, longest, max_length)
        prompt = _cut_left(prompt, room, tokenizer.bos_token_id)
        at = len(kept)
        for block, completion in enumerate(choices):
            length, first = len(prompt) + len(completion), 3 * block
            packed[at, first + IDS, :length] = prompt + completion
            packed[at, first + MASK, :length] = 1
            packed[at, first + COMPLETION, len(prompt) : length] = 1
        kept.append(row)
    return np.ascontiguousarray(packed[: len(kept)]), np.array(kept, dtype=np.int64)


def _answer_texts(
    pairs: np.ndarray, texts: list[tuple[str, str]], tokenizer: Any, what: str
) -> list[list[str]]:
    """Each row's completion texts to pack: its answer, then (multiple choice) its wrong
    choices rendered the same way. Every row of a split has choices, or none has."""
    answers = [[completion] for _, completion in texts]
    found = [pair_choices(pair) for pair in pairs]
    if all(choices is None for choices in found):
        return answers
    for row, (pair, choices) in enumerate(zip(pairs, found, strict=True)):
        if choices is None:
            raise DataError(
                f"{what}: row {row} (counting from 0) has no choices while others have: a "
                "split holds multiple-choice rows or prompt / completion rows, not both"
            )
        options, right = choices
        for index, option in enumerate(options):
            if index != right:
                wrong = np.array([pair[0], option], dtype=object)
                answers[row].append(render(wrong, tokenizer, what, row)[1])
    return answers


def _regroup(flat: list[list[int]], like: list[list[str]]) -> list[list[list[int]]]:
    """``flat`` cut back into the row lengths of ``like``."""
    out, start = [], 0
    for row in like:
        out.append(flat[start : start + len(row)])
        start += len(row)
    return out


def encode_splits(
    splits: Splits, tokenizer: Any, max_length: int, overflow: str, what: str
) -> tuple[Splits, int]:
    """Every split of prompt / completion pairs encoded (:func:`encode_prompts`); the
    encoded splits' digest covers the rendering, so another chat template gives another
    digest. Returns them and the number of rows dropped in all."""
    if not splits.is_prompts:
        raise DataError(
            f"{what}: a causal language model trains on prompts and completions: set "
            "prompt_column and completion_column, or messages_column"
        )
    arrays: dict[str, np.ndarray] = {}
    dropped = 0
    for name in ("train", "val", "test"):
        x, y = splits.split(name)
        where = f"{what} ({name} split)"
        packed, kept = encode_prompts(x, tokenizer, max_length, overflow, where)
        if len(kept) == 0:
            raise DataError(
                f"{where}: every row's completion is longer than max_length {max_length} "
                "allows: raise base_model.max_length"
            )
        arrays[f"x_{name}"], arrays[f"y_{name}"] = packed, y[kept]
        dropped += len(x) - len(kept)
    return Splits(**arrays, num_classes=splits.num_classes), dropped


def render(pair: np.ndarray, tokenizer: Any, what: str, row: int) -> tuple[str, str]:
    """(prompt text, completion text) of one pair. Without a chat template the completion
    has no EOS yet: :func:`encode_prompts` appends its id."""
    messages, answer = prompt_messages(pair), str(pair[1])
    if not _chat_template(tokenizer):
        return "\n".join(m["content"] for m in messages) + "\n", answer
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": ANSWER_ROLE, "content": answer}], tokenize=False
        )
    except Exception as error:  # a template's own refusal (roles must alternate, ...)
        first = (str(error).splitlines() or [""])[0][:200]
        raise DataError(
            f"{what}: row {row} (counting from 0): the chat template cannot render it "
            f"({type(error).__name__}: {first})"
        ) from None
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise DataError(
            f"{what}: row {row} (counting from 0): the chat template does not render the "
            "conversation as its generation prompt followed by the answer, so the answer's "
            "tokens cannot be told apart: use a template that does"
        )
    return prompt, full[len(prompt) :]


def prompt_ids(packed: np.ndarray) -> list[list[int]]:
    """Each row's prompt tokens (attended, not completion): what generation starts from."""
    prompt = (packed[:, MASK] == 1) & (packed[:, COMPLETION] == 0)
    return [ids[keep].tolist() for ids, keep in zip(packed[:, IDS], prompt, strict=True)]


def completion_ids(packed: np.ndarray) -> list[list[int]]:
    """Each row's completion tokens: the reference a generated answer is scored against."""
    target = packed[:, COMPLETION] == 1
    return [ids[keep].tolist() for ids, keep in zip(packed[:, IDS], target, strict=True)]


def _chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _pad_id(tokenizer: Any, what: str) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise DataError(
            f"{what}: the tokenizer has neither a pad nor an eos token: a causal language "
            "model needs an eos token to end its answers"
        )
    return int(pad)


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added: the template carries its own."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _cut_left(prompt: list[int], room: int, bos: int | None) -> list[int]:
    """The last ``room`` tokens of the prompt, after its BOS if it starts with one."""
    if len(prompt) <= room:
        return prompt
    if bos is not None and prompt[0] == bos and room >= 2:
        return [bos, *prompt[len(prompt) - room + 1 :]]
    return prompt[len(prompt) - room :]


def _refuse(
    what: str, row: int, prompt: list[int], completion: list[int], max_length: int
) -> NoReturn:
    if not prompt:
        raise DataError(
            f"{what}: row {row} (counting from 0)'s prompt renders to no tokens: a completion "
            "needs a prompt to follow"
        )
    raise DataError(
        f"{what}: row {row}'s completion is {len(completion)} tokens, more than max_length "
        f"{max_length} allows: raise base_model.max_length or set dataset.overflow: drop"
    )

"""Training loss and validation metrics of causal language models on packed completion batches.

A batch is ``packed``, int64 of shape ``(rows, 3, length)``: token ids, attention mask (right
padded) and completion mask (1 exactly on the completion's tokens; the prompt is the real tokens
before them). A model is any ``logits_fn(packed) -> (rows, L', vocab)`` with ``L' <= length``
(trimmed to the longest row); position ``t`` predicts token ``t + 1``. Multiple-choice splits
are ``(rows, 3 * C, length)``: channels 0..2 are the right choice, so every metric here but
:func:`choice_accuracy` reads them as a plain split; each further block of three is a wrong
choice (empty: no attention, no completion, where a row has fewer; ``workers.data.prompts``).

Greedy generation keeps rows right-padded: each row's next token is read at its own last real
position, and every row keeps the positions it has alone, so a batch generates what each prompt
generates by itself. A ``logits_fn`` whose ``kv_cache`` attribute is true (the forward of a plain
causal LM at some weights, ``workers.search.evaluate``) also takes ``attention_mask``,
``position_ids`` and ``past_key_values`` keywords: it then runs each prompt once and one token
per step, the padding masked out where it sits in the cache. Any other ``logits_fn`` (a
linearized model, a test's function) runs the whole prefix again at every step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional

from storage.errors import DataError

LogitsFn = Callable[[Tensor], Tensor]
Packed = np.ndarray | Tensor
IDS, ATTENTION, COMPLETION = 0, 1, 2


def _fitted(logits: Tensor, packed: Packed) -> tuple[Tensor, int]:
    """``packed`` on the logits' device, and the logits' length, checked to fit each other."""
    packed = torch.as_tensor(packed).to(logits.device)
    if logits.shape[0] != packed.shape[0] or logits.shape[1] > packed.shape[2]:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit packed {tuple(packed.shape)}")
    length = logits.shape[1]
    if bool(packed[:, COMPLETION, length:].any()):
        raise ValueError(f"completion tokens beyond the logits' {length} positions")
    return packed, length


def completion_logits(logits: Tensor, packed: Packed) -> tuple[Tensor, Tensor]:
    """The logits that predict completion tokens, ``(n, vocab)``, and those tokens, ``(n,)``.

    Only completion tokens are targets; a completion's first token is predicted at the prompt's
    last position. ``logits`` may be shorter than ``length`` (trimmed to the longest row).
    """
    packed, length = _fitted(logits, packed)
    targets = packed[:, COMPLETION, 1:length].bool()
    return logits[:, :-1][targets], packed[:, IDS, 1:length][targets].long()


def completion_loss(logits: Tensor, packed: Packed) -> Tensor:
    """Mean next-token cross entropy over the batch's completion tokens (token-weighted)."""
    predicting, tokens = completion_logits(logits, packed)
    if len(tokens) == 0:
        raise DataError("a batch has no completion tokens to train on: check its completion mask")
    return functional.cross_entropy(predicting.float(), tokens)


def _batches(packed: Packed, batch_size: int) -> Iterator[Tensor]:
    packed = torch.as_tensor(packed)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    for start in range(0, len(packed), batch_size):
        yield packed[start : start + batch_size]


def _split_mean(total: float, count: int, what: str) -> float:
    if count == 0:
        raise DataError(f"no completion tokens to score {what} on: check the completion mask")
    return total / count


@torch.no_grad()
def token_accuracy(logits_fn: LogitsFn, packed: Packed, batch_size: int) -> float:
    """Teacher-forced next-token accuracy (argmax) over all completion tokens of the split."""
    right = count = 0
    for batch in _batches(packed, batch_size):
        predicting, tokens = completion_logits(logits_fn(batch), batch)
        right += int((predicting.argmax(dim=-1) == tokens).sum())
        count += len(tokens)
    return _split_mean(right, count, "token accuracy")


@torch.no_grad()
def nll(logits_fn: LogitsFn, packed: Packed, batch_size: int) -> float:
    """Mean negative log-likelihood per completion token over the split (nats)."""
    total, count = 0.0, 0
    for batch in _batches(packed, batch_size):
        predicting, tokens = completion_logits(logits_fn(batch), batch)
        total += float(functional.cross_entropy(predicting.float(), tokens, reduction="sum"))
        count += len(tokens)
    return _split_mean(total, count, "nll")


def completion_log_probs(logits: Tensor, packed: Packed) -> Tensor:
    """Each row's summed log-probability of its completion tokens given what precedes them,
    ``(rows,)`` float32."""
    packed, length = _fitted(logits, packed)
    log_probs = functional.log_softmax(logits[:, :-1].float(), dim=-1)
    tokens = packed[:, IDS, 1:length].long()
    picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    completion = packed[:, COMPLETION, 1:length].bool()
    return torch.where(completion, picked, torch.zeros_like(picked)).sum(dim=1)


@torch.no_grad()
def choice_scores(logits_fn: LogitsFn, packed: Packed, batch_size: int) -> Tensor:
    """``(rows, C)`` summed log-probabilities of each row's choices (column 0: the right one;
    ``-inf`` where a row has fewer choices). ``batch_size`` counts choices per forward pass."""
    packed = torch.as_tensor(packed)
    if packed.ndim != 3 or packed.shape[1] < 6 or packed.shape[1] % 3:
        raise DataError(
            "choice_accuracy needs choices_column and answer_column: this split has no choices"
        )
    rows, blocks = packed.shape[0], packed.shape[1] // 3
    choices = packed.reshape(rows * blocks, 3, packed.shape[2])
    real = choices[:, COMPLETION].any(dim=1)  # padding blocks are never run
    scores = torch.full((rows * blocks,), float("-inf"))
    sums = [
        completion_log_probs(logits_fn(batch), batch).cpu()
        for batch in _batches(choices[real], batch_size)
    ]
    if sums:
        scores[real] = torch.cat(sums)
    return scores.reshape(rows, blocks)


def choice_accuracy(logits_fn: LogitsFn, packed: Packed, batch_size: int) -> float:
    """Fraction of rows whose right choice has a higher summed completion log-probability than
    every wrong choice (a tie counts as wrong). Unnormalised by length, as in lm-eval's
    ``acc``."""
    scores = choice_scores(logits_fn, packed, batch_size)
    if len(scores) == 0:
        raise DataError("no rows to score choice accuracy on")
    right = scores[:, 0] > scores[:, 1:].max(dim=1).values
    return float(right.double().mean())


def prompts_of(packed: Packed) -> list[Tensor]:
    """Each row's prompt ids: its real tokens before the completion (a prefix of the row)."""
    packed = torch.as_tensor(packed).cpu()
    prompt = packed[:, ATTENTION].bool() & ~packed[:, COMPLETION].bool()
    lengths = prompt.sum(dim=1)
    if not torch.equal(prompt, torch.arange(prompt.shape[1]) < lengths[:, None]):
        raise DataError("a row's prompt is not a prefix of its tokens: check the masks")
    if bool((lengths == 0).any()):
        raise DataError("a row has an empty prompt: there is nothing to generate from")
    return [row[:n] for row, n in zip(packed[:, IDS], lengths.tolist(), strict=True)]


def _stop_ids(eos_id: int | Collection[int] | None) -> set[int]:
    if eos_id is None:
        return set()
    return {eos_id} if isinstance(eos_id, int) else set(eos_id)


@torch.no_grad()
def generate_greedy(
    logits_fn: LogitsFn,
    packed: Packed,
    batch_size: int,
    max_new_tokens: int,
    eos_id: int | Collection[int] | None,
) -> list[list[int]]:
    """Greedy continuation ids of each row's prompt, eos included, as ``generate()`` returns.

    A row stops after an ``eos_id`` token or ``max_new_tokens`` tokens. With a KV cache where
    ``logits_fn`` offers one (see the module docstring).
    """
    stops = _stop_ids(eos_id)
    generated: list[list[int]] = []
    for batch in _batches(packed, batch_size):
        prompts = prompts_of(batch)
        if getattr(logits_fn, "kv_cache", False):
            generated.extend(_generate_cached(logits_fn, prompts, max_new_tokens, stops))
            continue
        lengths = torch.tensor([len(p) for p in prompts])
        rows = torch.zeros(len(prompts), 3, int(lengths.max()) + max_new_tokens, dtype=torch.int64)
        for row, prompt in zip(rows, prompts, strict=True):
            row[IDS, : len(prompt)] = prompt
            row[ATTENTION, : len(prompt)] = 1
        new: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        for _ in range(max_new_tokens):
            if not active:
                break
            width = int(lengths[active].max())
            logits = logits_fn(rows[active, :, :width])
            last = (lengths[active] - 1).to(logits.device)
            chosen = logits[torch.arange(len(active), device=logits.device), last].argmax(dim=-1)
            for index, token in zip(active, chosen.tolist(), strict=True):
                rows[index, IDS, lengths[index]] = token
                rows[index, ATTENTION, lengths[index]] = 1
                lengths[index] += 1
                new[index].append(token)
            active = [i for i in active if new[i][-1] not in stops]
        generated.extend(new)
    return generated


def _generate_cached(
    logits_fn: Callable[..., Tensor], prompts: list[Tensor], max_new_tokens: int, stops: set[int]
) -> list[list[int]]:
    """:func:`generate_greedy` of one batch with a KV cache: the right-padded prompts run once,
    then each step feeds one token per row at that row's own next position. A finished row
    keeps being fed (its tokens are dropped) so the batch keeps its shape."""
    from transformers import DynamicCache

    lengths = torch.tensor([len(p) for p in prompts])
    rows, width = len(prompts), int(lengths.max())
    ids = torch.zeros(rows, width, dtype=torch.int64)
    mask = torch.zeros(rows, width, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)], mask[row, : len(prompt)] = prompt, 1
    positions = torch.arange(width).expand(rows, width)
    cache = DynamicCache()
    logits = logits_fn(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    chosen = logits[torch.arange(rows), (lengths - 1).to(logits.device)].argmax(dim=-1).cpu()
    new: list[list[int]] = [[] for _ in prompts]
    active = set(range(rows))
    for step in range(max_new_tokens):
        for row in sorted(active):
            new[row].append(int(chosen[row]))
        active = {row for row in active if new[row][-1] not in stops}
        if not active or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], dim=1)
        logits = logits_fn(
            chosen[:, None],
            attention_mask=mask,
            position_ids=(lengths + step)[:, None],
            past_key_values=cache,
        )
        chosen = logits[:, -1].argmax(dim=-1).cpu()
    return new


def greedy_completions(
    logits_fn: LogitsFn,
    packed: Packed,
    batch_size: int,
    max_new_tokens: int,
    eos_id: int | Collection[int] | None,
    decode: Callable[[list[int]], str],
) -> list[str]:
    """The decoded greedy completion of each row's prompt (see :func:`generate_greedy`)."""
    ids = generate_greedy(logits_fn, packed, batch_size, max_new_tokens, eos_id)
    return [decode(row) for row in ids]


def normalize_answer(text: str, end_texts: Collection[str] = ()) -> str:
    """Lowercase, whitespace collapsed and stripped, less a trailing end-of-turn/eos text."""
    text = re.sub(r"\s+", " ", text).strip().lower()
    for end in sorted({re.sub(r"\s+", " ", e).strip().lower() for e in end_texts} - {""}):
        text = text.removesuffix(end).strip()
    return text


def reference_completions(packed: Packed) -> list[list[int]]:
    """Each row's completion ids (its completion-masked tokens)."""
    packed = torch.as_tensor(packed).cpu()
    completion = packed[:, COMPLETION].bool()
    return [row[mask].tolist() for row, mask in zip(packed[:, IDS], completion, strict=True)]


def exact_match(
    logits_fn: LogitsFn,
    packed: Packed,
    batch_size: int,
    max_new_tokens: int,
    eos_id: int | Collection[int] | None,
    decode: Callable[[list[int]], str],
) -> float:
    """Fraction of rows whose greedy completion equals the reference after normalisation.

    Both sides go through ``decode`` (skipping special tokens is the caller's choice) and then
    :func:`normalize_answer`, which also drops a trailing ``decode([eos])`` text.
    """
    generated = greedy_completions(logits_fn, packed, batch_size, max_new_tokens, eos_id, decode)
    if not generated:
        raise DataError("no rows to score exact match on")
    ends = [decode([token]) for token in _stop_ids(eos_id)]
    references = [decode(ids) for ids in reference_completions(packed)]
    matches = sum(
        normalize_answer(answer, ends) == normalize_answer(reference, ends)
        for answer, reference in zip(generated, references, strict=True)
    )
    return matches / len(generated)

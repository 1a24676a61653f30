"""The exact fast path for causal LMs in linear mode: score merges without running the body.

A causal LM fine-tuned in linear mode with its output head frozen (δ = 0 on the head, and so on
the shared embedding when the head is tied) has logits W0 (h0(x) + J_h(x) δ) + b0, where h is
the final hidden state and (W0, b0) the frozen head (Ortiz-Jiménez et al. 2023 for the
linearization; DESIGN.md, "The exact fast path"). For a merge with direction Σ_s α_s τ_s:

    h(α) = h0 + Σ_s α_s G_s,   G_s = J_h τ_s,   logits(α) = W0 h(α) + b0,

affine in α before the head. `build_lm_fast_path` runs the body once per batch of each task's
rows (one vmapped jvp over every task vector, the primal shared) and keeps h0 and G_s only at
the positions that predict completion tokens, with those tokens. Afterwards a batch of
coefficient vectors is scored through W0 alone, in chunks bounded by ``max_elements`` logits.
Exact for methods linear in τ (task_arithmetic, weight_average) on linear-mode task vectors.
Pure torch; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from storage.errors import DataError, MergeInputError, ModelError
from workers.finetune.linearized import jvp_many
from workers.merge.validation import validate_coefficient
from workers.models.causal_lm import CausalLM, CausalLMBody, head_parameters
from workers.search.lm_metrics import completion_logits

DEFAULT_MAX_ELEMENTS = 1 << 24
"""Logits materialised at once when scoring (candidates × tokens × vocab): 64 MiB in float32."""


def coefficient_vector(coefficients: Mapping[str, float], names: Sequence[str]) -> Tensor:
    """The coefficients as a float64 ``(S,)`` vector in the order of ``names`` (the vectors).

    Every name needs a finite coefficient and no other name has one, as ``merge()`` checks
    (with its messages): a missing task is an error, not a zero.
    """
    validate_coefficient(
        coefficients, dict.fromkeys(names), method="task_arithmetic", per_task=True
    )
    return torch.tensor([float(coefficients[name]) for name in names], dtype=torch.float64)


@dataclass(frozen=True)
class LMFastPath:
    """Cached h0 ``(n_t, D)``, G ``(S, n_t, D)`` and targets ``(n_t,)`` per task, and the head.

    ``n_t`` counts task t's completion tokens; coefficient columns follow ``vectors``.
    """

    vectors: tuple[str, ...]
    base_hidden: dict[str, Tensor]
    directions: dict[str, Tensor]
    targets: dict[str, Tensor]
    weight: Tensor  # (V, D)
    bias: Tensor | None  # (V,)
    max_elements: int = DEFAULT_MAX_ELEMENTS

    @property
    def tasks(self) -> list[str]:
        return list(self.base_hidden)

    def _coefficients(self, coefficients: Tensor) -> Tensor:
        coefficients = torch.as_tensor(coefficients)
        if coefficients.ndim != 2 or coefficients.shape[1] != len(self.vectors):
            raise MergeInputError(
                f"coefficients of shape {tuple(coefficients.shape)}: expected (candidates, "
                f"{len(self.vectors)}), one column per task vector ({', '.join(self.vectors)})"
            )
        return coefficients.to(self.weight.device, self.weight.dtype)

    def _logits(self, coefficients: Tensor, task: str, start: int, stop: int) -> Tensor:
        """(B, stop − start, V) logits of tokens start..stop of ``task`` for (B, S) α."""
        directions = self.directions[task][:, start:stop]
        mixed = torch.einsum("bs,snd->bnd", coefficients, directions)
        logits = (self.base_hidden[task][start:stop] + mixed) @ self.weight.T
        return logits if self.bias is None else logits + self.bias

    def logits_for(self, coefficients: Tensor, task: str) -> Tensor:
        """``(n_t, V)`` logits at task ``task``'s completion-predicting positions for (S,) α."""
        alpha = self._coefficients(torch.as_tensor(coefficients).reshape(1, -1))
        return self._logits(alpha, task, 0, len(self.targets[task]))[0]

    def token_accuracy_matrix(self, coefficients: Tensor) -> Tensor:
        """(B, T) float64 teacher-forced token accuracies, tasks in `tasks` order, for (B, S) α.

        The same numbers as :func:`workers.search.lm_metrics.token_accuracy` of the linearized
        merge (argmax over the vocabulary, token-weighted over the task's split).
        """
        alpha = self._coefficients(coefficients)
        vocab = self.weight.shape[0]
        candidates = max(1, min(len(alpha), self.max_elements // vocab))
        result = torch.empty(len(alpha), len(self.tasks), dtype=torch.float64)
        for column, task in enumerate(self.tasks):
            targets = self.targets[task]
            for first in range(0, len(alpha), candidates):
                block = alpha[first : first + candidates]
                tokens = max(1, self.max_elements // (len(block) * vocab))
                right = torch.zeros(len(block), dtype=torch.int64, device=targets.device)
                for start in range(0, len(targets), tokens):
                    logits = self._logits(block, task, start, start + tokens)
                    right += (logits.argmax(dim=2) == targets[start : start + tokens]).sum(dim=1)
                # Exact integer counts, then one division: the same float as right / count.
                result[first : first + len(block), column] = right.cpu().double() / len(targets)
        return result

    def token_accuracies(self, coefficients: Tensor) -> dict[str, Tensor]:
        """Token accuracy (B,) per task for a (B, S) batch of coefficient vectors."""
        matrix = self.token_accuracy_matrix(coefficients)
        return {task: matrix[:, index] for index, task in enumerate(self.tasks)}

    # The names the search reads on any fast path (see workers.search.fastpath.FastPath).
    @property
    def sources(self) -> tuple[str, ...]:
        return self.vectors

    def accuracies(self, coefficients: Tensor) -> dict[str, Tensor]:
        return self.token_accuracies(coefficients)

    def accuracy_matrix(self, coefficients: Tensor) -> Tensor:
        return self.token_accuracy_matrix(coefficients)


def _refuse_head_changes(
    task_vectors: Mapping[str, Mapping[str, Tensor]], heads: Sequence[str]
) -> None:
    for source, vector in task_vectors.items():
        for name in heads:
            if name in vector and bool(vector[name].any()):
                raise MergeInputError(
                    f"task vector {source!r} changes the LM head ({name!r}): the fast path needs "
                    "a frozen LM head (fine-tune in linear mode with the head frozen)"
                )


def _check_head_gives_the_logits(
    model: CausalLM,
    theta0: Mapping[str, Tensor],
    batch: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
) -> None:
    """Refuse an architecture whose logits are not ``head(last hidden state)`` (e.g. capped)."""
    want = functional_call(model, dict(theta0), (batch,))
    got = hidden @ weight.T if bias is None else hidden @ weight.T + bias
    scale = float(want.abs().max())
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
        raise ModelError(
            f"{type(model.lm).__name__}: its logits are not the output head applied to the last "
            "hidden state (scaled or capped logits?), so the LM fast path does not apply; "
            "score the merges with real forward passes"
        )


@torch.no_grad()
def build_lm_fast_path(
    model: CausalLM,
    theta0: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    inputs: Mapping[str, np.ndarray | Tensor],
    batch_size: int,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> LMFastPath:
    """Cache h0 and J_h τ_s at the completion-predicting positions of every task in ``inputs``.

    ``theta0`` is the CausalLM's state (as its ``state_dict`` names it); ``task_vectors`` are
    the directions s, their order fixing the coefficient columns, and must leave the output
    head unchanged; ``inputs[t]`` is task t's packed ``(rows, 3, length)`` split. Rows are run
    ``batch_size`` at a time, each batch trimmed to its longest row as the model trims it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if not task_vectors:
        raise MergeInputError("the LM fast path needs at least one task vector")
    names = head_parameters(model)
    heads = sorted(names.values())
    _refuse_head_changes(task_vectors, heads)
    weight = theta0[names["weight"]]
    bias = theta0[names["bias"]] if "bias" in names else None
    body = CausalLMBody(model)
    vectors = tuple(task_vectors)
    directions_in = [task_vectors[source] for source in vectors]
    base_hidden: dict[str, Tensor] = {}
    directions: dict[str, Tensor] = {}
    targets: dict[str, Tensor] = {}
    checked = False
    for task, split in inputs.items():
        packed = torch.as_tensor(split).to(weight.device)
        hidden_rows, tangent_rows, token_rows = [], [], []
        for start in range(0, len(packed), batch_size):
            batch = packed[start : start + batch_size]
            hidden, tangents = jvp_many(body, theta0, directions_in, batch, frozen=heads)
            if not checked:
                _check_head_gives_the_logits(model, theta0, batch, hidden, weight, bias)
                checked = True
            kept, tokens = completion_logits(hidden, batch)
            hidden_rows.append(kept)
            tangent_rows.append(torch.stack([completion_logits(t, batch)[0] for t in tangents]))
            token_rows.append(tokens)
        if not hidden_rows or sum(len(tokens) for tokens in token_rows) == 0:
            raise DataError(
                f"task {task!r} has no completion tokens to score: check its completion mask"
            )
        base_hidden[task] = torch.cat(hidden_rows)
        directions[task] = torch.cat(tangent_rows, dim=1)
        targets[task] = torch.cat(token_rows)
    return LMFastPath(vectors, base_hidden, directions, targets, weight, bias, max_elements)

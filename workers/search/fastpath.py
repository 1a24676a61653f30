"""The exact fast path: score linear-mode merges without a forward pass per candidate.

With a frozen linear head (W_t, b_t) and the linearized model, the logits of a merge whose
direction is Σ_s α_s τ_s are affine in the coefficients α (DESIGN.md, "The exact fast path"):

    logits_t(α) = W_t (f(X_t; θ0) + Σ_s α_s J(X_t) τ_s) + b_t
                = L_t + Σ_s α_s G_ts,   L_t = W_t f(X_t; θ0) + b_t,   G_ts = W_t J(X_t) τ_s.

`build_fast_path` computes L_t and G_ts once (a jvp per task vector s over every task's
rows, vmapped over s so the primal runs once); afterwards any batch of coefficient vectors
is scored by one matrix product over all tasks packed side by side. This is exact for
methods registered as linear in τ (a `LinearForm`: task_arithmetic, weight_average) on
linear-mode task vectors; on standard-mode task vectors the same numbers are *post-hoc
linearization*, a cheap surrogate.
Pure torch; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workers.finetune.linearized import jvp_many
from workers.merge import get_method
from workers.merge.validation import validate_coefficient


def linear_weights(
    method: str,
    params: Mapping[str, Any],
    coefficient: float | Mapping[str, float],
    sources: Sequence[str],
) -> list[float] | None:
    """The α_s with θ − θ0 = Σ_s α_s τ_s for this candidate, or None if it is not linear in τ
    (its registration's `LinearForm` with these params says how α follows from the
    coefficient)."""
    registered = get_method(method)
    form = registered.linear_form(params)
    if form is None:
        return None
    if isinstance(coefficient, Mapping) and not registered.per_task_coefficients:
        return None
    # merge()'s own check: a task without a coefficient is an error, never a zero
    validate_coefficient(coefficient, dict.fromkeys(sources), method=method, per_task=True)
    return form.weights(coefficient, sources)


@dataclass(frozen=True)
class FastPath:
    """Cached L_t (N_t, C_t) and G_t (S, N_t, C_t) for every evaluated task t.

    All tasks are also packed side by side (classes padded with -inf logits), so that scoring
    a batch is a handful of tensor operations whatever the number of tasks.
    """

    sources: tuple[str, ...]
    base_logits: dict[str, Tensor]
    directions: dict[str, Tensor]
    labels: dict[str, Tensor]
    packed_base: Tensor  # (ΣN, C_max)
    packed_directions: Tensor  # (S, ΣN · C_max)
    packed_labels: Tensor  # (ΣN,)
    task_rows: Tensor  # (ΣN, T): 1 where a row belongs to task t
    task_sizes: Tensor  # (T,): N_t

    @classmethod
    def create(
        cls,
        sources: tuple[str, ...],
        base_logits: dict[str, Tensor],
        directions: dict[str, Tensor],
        labels: dict[str, Tensor],
    ) -> FastPath:
        tasks = list(base_logits)
        width = max(base_logits[t].shape[1] for t in tasks)
        rows = [len(labels[t]) for t in tasks]
        dtype = base_logits[tasks[0]].dtype
        base = torch.full((sum(rows), width), float("-inf"), dtype=dtype)
        mixed = torch.zeros((len(sources), sum(rows), width), dtype=dtype)
        members = torch.zeros((sum(rows), len(tasks)), dtype=torch.float64)
        start = 0
        for index, task in enumerate(tasks):
            count, classes = rows[index], base_logits[task].shape[1]
            base[start : start + count, :classes] = base_logits[task]
            mixed[:, start : start + count, :classes] = directions[task]
            members[start : start + count, index] = 1.0
            start += count
        packed_labels = torch.cat([labels[t] for t in tasks])
        return cls(
            sources,
            base_logits,
            directions,
            labels,
            base,
            mixed.reshape(len(sources), -1),
            packed_labels,
            members,
            torch.tensor([max(count, 1) for count in rows], dtype=torch.float64),
        )

    @property
    def tasks(self) -> list[str]:
        return list(self.base_logits)

    def logits(self, coefficients: Tensor, task: str) -> Tensor:
        """(B, N_t, C_t) logits of task ``task`` for a (B, S) batch of coefficient vectors."""
        directions = self.directions[task]
        count, rows, classes = directions.shape
        mixed = coefficients.to(directions.dtype) @ directions.reshape(count, rows * classes)
        return self.base_logits[task] + mixed.reshape(-1, rows, classes)

    def accuracy_matrix(self, coefficients: Tensor) -> Tensor:
        """(B, T) top-1 accuracies, tasks in `tasks` order, for a (B, S) batch."""
        mixed = coefficients.to(self.packed_directions.dtype) @ self.packed_directions
        logits = mixed.reshape(len(coefficients), *self.packed_base.shape) + self.packed_base
        correct = logits.argmax(dim=2) == self.packed_labels
        # Exact integer counts, then one division: the same float as correct / N_t.
        return (correct.to(torch.float64) @ self.task_rows) / self.task_sizes

    def accuracies(self, coefficients: Tensor) -> dict[str, Tensor]:
        """Top-1 accuracy (B,) per task for a (B, S) batch of coefficient vectors."""
        matrix = self.accuracy_matrix(coefficients)
        return {task: matrix[:, index] for index, task in enumerate(self.tasks)}


def _as_tuple(x: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _joinable(parts: list[tuple[Tensor, ...]]) -> bool:
    shapes = {tuple((p.shape[1:], p.dtype) for p in part) for part in parts}
    return len(shapes) == 1


@torch.no_grad()
def build_fast_path(
    module: nn.Module,
    theta0: Mapping[str, Tensor],
    task_vectors: Mapping[str, Mapping[str, Tensor]],
    heads: Mapping[str, Mapping[str, Tensor]],
    inputs: Mapping[str, Tensor | tuple[Tensor, ...]],
    labels: Mapping[str, Tensor],
    batch_size: int = 1024,
) -> FastPath:
    """Cache f(X_t; θ0) and J(X_t) τ_s through each task's head, for t in ``inputs``.

    ``task_vectors`` are the directions s (their order fixes the coefficient columns);
    ``heads[t]`` is task t's frozen linear head {weight (C, D), bias (C,)}; ``inputs[t]`` is
    the module's input, or a tuple of inputs (e.g. token ids and attention mask). Inputs of
    the same shape are evaluated together: one vmapped jvp over all task vectors per batch
    of rows (the primal f(X; θ0) is computed once).
    """
    sources = tuple(task_vectors)
    tasks = list(inputs)
    parts = [_as_tuple(inputs[t]) for t in tasks]
    groups = [tasks] if _joinable(parts) else [[t] for t in tasks]
    features: dict[str, Tensor] = {}
    tangents: dict[str, list[Tensor]] = {}
    for group in groups:
        joined = tuple(
            torch.cat([_as_tuple(inputs[t])[i] for t in group]) for i in range(len(parts[0]))
        )
        base_rows: list[Tensor] = []
        columns: list[list[Tensor]] = [[] for _ in sources]
        directions_in = [task_vectors[source] for source in sources]
        for start in range(0, len(joined[0]), batch_size):
            chunk = tuple(part[start : start + batch_size] for part in joined)
            output, stacked = jvp_many(module, theta0, directions_in, chunk)
            base_rows.append(output)
            for index in range(len(sources)):
                columns[index].append(stacked[index])
        sizes = [len(_as_tuple(inputs[t])[0]) for t in group]
        for task, block in zip(group, torch.cat(base_rows).split(sizes), strict=True):
            features[task] = block
        for column in columns:
            for task, block in zip(group, torch.cat(column).split(sizes), strict=True):
                tangents.setdefault(task, []).append(block)
    base_logits, directions = {}, {}
    for task in tasks:
        weight, bias = heads[task]["weight"], heads[task]["bias"]
        base_logits[task] = features[task] @ weight.T + bias
        directions[task] = torch.stack([tangent @ weight.T for tangent in tangents[task]])
    return FastPath.create(
        sources, base_logits, directions, {t: torch.as_tensor(labels[t]) for t in tasks}
    )

"""TIES merging: trim, elect sign, disjoint merge.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS).

1. Trim: keep the entries of each τ_t whose |value| is >= the k-th largest, k = ceil(density·n)
   (at least 1); ties at the threshold are kept. `scope: global` (default, as the paper) takes n
   over the task's whole flattened backbone, `per_tensor` (as mergekit) over each tensor.
2. Elect: γ = sign(Σ_t τ̂_t); where the sum is exactly 0, γ takes the majority sign: the sign of
   Σ γ (count of + minus count of −; + when that is 0 too), over the whole backbone the merge
   covers with `scope: global` (as the paper's `resolve_sign` on the flattened vector), over
   the tensor with `per_tensor`.
3. Disjoint merge of the τ̂_t whose sign equals γ: `mean` (divided by their count, at least 1),
   `sum`, or `max` (γ times the largest agreeing |value|).
4. θ = θ0 + λ · τ_merged. Per-task coefficients scale each τ_t by α_t before step 1, then λ = 1.

Streaming with `scope: global`: compute `thresholds` with `global_trim_thresholds` over the
same (α-scaled) task vectors, then `majority` with `global_majority_sign` (one more pass), then
merge tensor by tensor passing both `thresholds=` and `majority=`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge.backbone import (
    Coefficient,
    StateDict,
    TaskVectors,
    finish,
    prepare_vectors,
    split_coefficient,
    stack_tasks,
    task_names,
    to_compute,
)
from workers.merge.registry import register

Scope = Literal["global", "per_tensor"]
MergeRule = Literal["mean", "sum", "max"]


class TiesParams(BaseModel):
    """Params of `ties` (MERGING.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    density: float = Field(0.2, gt=0, le=1)
    scope: Scope = "global"
    merge: MergeRule = "mean"


def trim_count(n: int, density: float) -> int:
    """How many of n entries the trim keeps: ceil(density·n) (exact decimal), 1 <= k <= n."""
    return min(n, max(1, math.ceil(Decimal(str(density)) * n)))


def task_trim_threshold(tensors: Iterable[Tensor], density: float) -> float:
    """The k-th largest |value| over all given tensors (one task), computed in memory."""
    flat = [tensor.detach().abs().flatten() for tensor in tensors]
    values = torch.cat(flat) if flat else torch.zeros(0)  # promotes mixed dtypes exactly
    n = values.numel()
    if n == 0:
        return 0.0
    return float(values.kthvalue(n - trim_count(n, density) + 1).values)


def trim(tensor: Tensor, threshold: float) -> Tensor:
    """Zero the entries whose |value| is below the threshold (ties at it are kept)."""
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


def sign_balance(summed: Tensor) -> int:
    """Entries with a positive sum minus entries with a negative one (exact, in int64)."""
    return int(torch.count_nonzero(summed > 0)) - int(torch.count_nonzero(summed < 0))


def majority_of(balance: int) -> float:
    """The majority sign for a sign balance: + when it is 0 (no majority)."""
    return 1.0 if balance >= 0 else -1.0


def sum_rows(stack: Tensor, out: Tensor | None = None) -> Tensor:
    """Σ over the first dimension, one row at a time in task order (into ``out`` if given):
    the same sum whatever part of the tensor is summed at once, unlike ``Tensor.sum``, whose
    order depends on the size."""
    total = stack[0].clone() if out is None else out.copy_(stack[0])
    for row in stack[1:]:
        total.add_(row)
    return total


def elect_and_merge(
    trimmed: Tensor, merge: MergeRule = "mean", majority: float | None = None
) -> Tensor:
    """TIES steps 2–3 over a (T, ...) stack of trimmed task tensors.

    `majority` fills the entries whose sum is exactly 0; None takes this tensor's own majority
    (per-tensor election), a global scope passes the whole backbone's.
    """
    summed = sum_rows(trimmed)
    if majority is None:
        majority = majority_of(sign_balance(summed))
    elected = torch.sign(summed)
    elected = torch.where(elected == 0, torch.full_like(elected, majority), elected)
    agrees = torch.sign(trimmed) == elected
    kept = torch.where(agrees, trimmed, torch.zeros_like(trimmed))
    if merge == "sum":
        return sum_rows(kept)
    if merge == "max":
        return elected * kept.abs().amax(dim=0)
    return sum_rows(kept) / agrees.sum(dim=0).clamp(min=1)


def ties_vectors(
    prepared: Mapping[str, Mapping[str, Tensor]],
    names: Iterable[str],
    *,
    density: float,
    scope: Scope,
    merge: MergeRule,
    thresholds: Mapping[str, float] | None = None,
    majority: float | None = None,
) -> dict[str, Tensor]:
    """τ_merged (steps 1–3) for each name, from task vectors already in compute dtype and scaled.

    A global scope computes its whole-backbone quantities here unless given (streaming gives
    both `thresholds` and `majority`, since each tensor alone cannot see the others).
    """
    tasks = task_names(prepared)
    names = list(names)
    if scope == "global":
        if (thresholds is None) != (majority is None):
            raise MergeInputError(
                "a streamed global ties trim needs both 'thresholds' (global_trim_thresholds) "
                "and 'majority' (global_majority_sign): pass both, or neither to compute them "
                "over the backbone given"
            )
        if thresholds is None:
            thresholds = {t: task_trim_threshold(prepared[t].values(), density) for t in tasks}
        _check_thresholds(thresholds, tasks)
        if majority is None:
            trimmed = (trim_stack(stack_tasks(prepared, name), thresholds, tasks) for name in names)
            majority = majority_of(sum(sign_balance(sum_rows(stack)) for stack in trimmed))
        _check_majority(majority)
    elif thresholds is not None or majority is not None:
        raise MergeInputError(
            "params 'thresholds' and 'majority' apply only to a global trim: drop them, or use "
            "scope: global"
        )
    merged: dict[str, Tensor] = {}
    for name in names:
        stacked = stack_tasks(prepared, name)
        if scope == "global":
            trimmed_stack = trim_stack(stacked, thresholds, tasks)  # type: ignore[arg-type]
        else:
            limits = [task_trim_threshold([row], density) for row in stacked]
            trimmed_stack = torch.stack(
                [trim(row, lim) for row, lim in zip(stacked, limits, strict=True)]
            )
        merged[name] = elect_and_merge(trimmed_stack, merge, majority)
    return merged


def trim_stack(stacked: Tensor, thresholds: Mapping[str, float], tasks: list[str]) -> Tensor:
    """Each row of a (T, ...) stack trimmed at its task's threshold (tasks in stack order)."""
    return torch.stack(
        [trim(row, thresholds[task]) for row, task in zip(stacked, tasks, strict=True)]
    )


def global_sign_balance(
    stream: Iterable[Mapping[str, Tensor]],
    thresholds: Mapping[str, float],
    coefficient: Coefficient = 1.0,
) -> int:
    """`sign_balance` of the globally trimmed sums, added up over the streamed tensors.

    `stream` yields, per tensor, `{task: τ_t tensor}` as `global_trim_thresholds` saw them;
    pass the same `coefficient` and the thresholds it returned.
    """
    balance = 0
    for by_task in stream:
        tasks = task_names(by_task)
        _check_thresholds(thresholds, tasks)
        scales, _ = split_coefficient(coefficient, tasks)
        prepared = prepare_vectors({task: {"": by_task[task]} for task in tasks}, scales)
        balance += sign_balance(sum_rows(trim_stack(stack_tasks(prepared, ""), thresholds, tasks)))
    return balance


def global_majority_sign(
    stream: Iterable[Mapping[str, Tensor]],
    thresholds: Mapping[str, float],
    coefficient: Coefficient = 1.0,
) -> float:
    """The whole-backbone majority sign of a global TIES election, one tensor at a time."""
    return majority_of(global_sign_balance(stream, thresholds, coefficient))


def _check_majority(majority: float) -> None:
    if isinstance(majority, bool) or majority not in (1.0, -1.0):
        raise MergeInputError(
            f"param 'majority' is {majority!r}: use 1.0 or -1.0, as global_majority_sign returns"
        )


def _check_thresholds(thresholds: Mapping[str, float], tasks: list[str]) -> None:
    for task in tasks:
        value = thresholds.get(task)
        if value is None or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise MergeInputError(
                f"param 'thresholds' has no valid value for task '{task}' (got {value!r}): "
                "compute them with global_trim_thresholds over every task"
            )


_DIGIT_BITS = 16
_BUCKETS = 1 << _DIGIT_BITS


def _keys(tensor: Tensor, scale: float | None) -> Tensor:
    """float64 bit patterns of |value|: ordered like the values since they are non-negative."""
    value = to_compute(tensor.detach())
    if scale is not None:
        value = value * scale
    return value.abs().to(torch.float64).flatten().contiguous().view(torch.int64)


def global_trim_thresholds(
    stream: Callable[[], Iterable[tuple[str, Tensor]]],
    density: float,
    coefficient: Coefficient = 1.0,
) -> dict[str, float]:
    """Each task's exact whole-backbone trim threshold, holding one tensor at a time.

    `stream()` yields `(task, τ_t tensor)` pairs and is called four times (one pass per 16-bit
    digit of the float64 bit pattern of |value|: a radix select with 65,536 counters per task).
    Pass the same `coefficient` as to `merge`: per-task α_t scale the tensors as ties does.
    """
    if not 0 < density <= 1:
        raise MergeInputError(f"ties param 'density' is {density!r}: use a value in (0, 1]")
    scales = coefficient if isinstance(coefficient, Mapping) else None
    seen: set[str] = set()
    prefixes: dict[str, int] = {}  # the digits chosen so far, per task with entries
    ranks: dict[str, int] = {}  # rank of the threshold among the values matching the prefix
    for shift in range(64 - _DIGIT_BITS, -1, -_DIGIT_BITS):
        first_pass = shift == 64 - _DIGIT_BITS
        counts: dict[str, Tensor] = {}
        for task, tensor in stream():
            if first_pass:
                seen.add(task)
            elif task not in ranks:
                continue
            keys = _keys(tensor, None if scales is None else float(scales[task]))
            if not first_pass:
                keys = keys[(keys >> (shift + _DIGIT_BITS)) == prefixes[task]]
            found = torch.bincount((keys >> shift) & (_BUCKETS - 1), minlength=_BUCKETS)
            counts[task] = counts[task] + found if task in counts else found
        if first_pass:
            sizes = {task: int(count.sum()) for task, count in counts.items()}
            ranks = {task: trim_count(n, density) for task, n in sizes.items() if n > 0}
            prefixes = dict.fromkeys(ranks, 0)
        for task in ranks:
            count = counts.get(task, torch.zeros(_BUCKETS, dtype=torch.int64))
            from_top = count.flip(0).cumsum(0)
            if int(from_top[-1]) < ranks[task]:
                raise MergeInputError(
                    f"task '{task}' yielded different tensors on another pass: stream() must "
                    "yield the same tensors every time it is called"
                )
            index = int(torch.searchsorted(from_top, torch.tensor(ranks[task])))
            digit = _BUCKETS - 1 - index
            ranks[task] -= int(from_top[index]) - int(count[digit])
            prefixes[task] = (prefixes[task] << _DIGIT_BITS) | digit
    return {task: _from_bits(prefixes[task]) if task in prefixes else 0.0 for task in sorted(seen)}


def _from_bits(bits: int) -> float:
    return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


def _global_density(params: TiesParams) -> float | None:
    return params.density if params.scope == "global" else None


@register(
    "ties",
    params_model=TiesParams,
    per_tensor=False,
    global_trim_density=_global_density,
    internal_params=("thresholds", "majority"),
    kernel="ties",
    scales_delta=True,
)
def ties(
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient,
    params: TiesParams,
    thresholds: Mapping[str, float] | None = None,
    majority: float | None = None,
) -> StateDict:
    """θ0 + λ · TIES(τ_1..τ_T); `thresholds` and `majority` are precomputed for streaming."""
    scales, lam = split_coefficient(coefficient, task_names(task_vectors))
    prepared = prepare_vectors(task_vectors, scales)
    merged = ties_vectors(
        prepared,
        base,
        density=params.density,
        scope=params.scope,
        merge=params.merge,
        thresholds=thresholds,
        majority=majority,
    )
    return {name: finish(base[name], merged[name], lam) for name in base}

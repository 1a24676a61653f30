"""Fused float32 kernels for the streaming engine: the method's exact result, fewer temporaries.

Fresh large allocations are costly (each new page is faulted in), so these kernels work in a
:class:`Workspace` of buffers reused from one tensor to the next, read the task vectors straight
into them, and update in place. Each follows its method's order of operations so the result
equals ``merge(...)`` bit for bit (tests/unit/test_merge_engine.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from workers.merge.backbone import Coefficient, split_coefficient
from workers.merge.registry import LinearForm
from workers.merge.ties import majority_of, sign_balance, sum_rows, trim_count

Read = Callable[[str, Tensor], Tensor]
"""``read(task, out)`` fills ``out`` with one tensor of that task ("" reads θ0)."""


class Workspace:
    """Reusable flat buffers, one per slot, so large tensors are not reallocated per step."""

    def __init__(self, reserve_bytes: int = 0) -> None:
        self.reserve_bytes = reserve_bytes
        self._buffers: dict[str, Tensor] = {}

    def get(self, slot: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, self.reserve_bytes), dtype=torch.uint8)
            self._buffers[slot] = buffer
        return buffer[:nbytes].view(dtype).view(tuple(shape))


def fused_linear(
    form: LinearForm,
    tasks: Sequence[str],
    coefficient: Coefficient,
    shape: Sequence[int],
    read: Read,
    workspace: Workspace,
) -> Tensor:
    """θ0 + λ Σ α_t τ_t (task_arithmetic), or θ0 + λ · mean τ_t for a `mean` form
    (weight_average), in place."""
    scales, lam = split_coefficient(coefficient, tasks)
    total = read(tasks[0], workspace.get("total", shape, torch.float32))
    if scales is not None:
        total.mul_(scales[tasks[0]])
    for task in tasks[1:]:
        value = read(task, workspace.get("scratch", shape, torch.float32))
        if scales is not None:
            value.mul_(scales[task])
        total.add_(value)
    if form.mean:
        total.div_(len(tasks))
    return total.mul_(lam).add_(read("", workspace.get("scratch", shape, torch.float32)))


def kth_largest(values: Tensor, k: int, workspace: Workspace) -> float:
    """The exact k-th largest of non-negative float32 values (1 <= k <= numel), no sort.

    Non-negative float32 bit patterns order like the values: a two-digit radix select over
    the 32-bit patterns (16 bits per digit), as ``ties.global_trim_thresholds`` does in float64.
    """
    bits = values.reshape(-1).view(torch.int32)
    high = workspace.get("elected", bits.shape, torch.int32)  # free until the election
    torch.bitwise_right_shift(bits, 16, out=high)
    counts = torch.bincount(high, minlength=_BUCKETS)
    digit, rank = _pick(counts, k)
    in_bucket = bits[torch.eq(high, digit, out=workspace.get("keep", bits.shape, torch.bool))]
    low_digit, _ = _pick(torch.bincount(in_bucket & (_BUCKETS - 1), minlength=_BUCKETS), rank)
    pattern = torch.tensor([(digit << 16) | low_digit], dtype=torch.int32)
    return float(pattern.view(torch.float32))


_BUCKETS = 1 << 16


def _pick(counts: Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the rank-th largest, and the rank within that bucket."""
    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(rank)))
    digit = _BUCKETS - 1 - index
    return digit, rank - (int(from_top[index]) - int(counts[digit]))


def _fill_trimmed(
    tasks: Sequence[str],
    scales: Mapping[str, float] | None,
    shape: Sequence[int],
    read: Read,
    workspace: Workspace,
    density: float,
    thresholds: Mapping[str, float] | None,
) -> Tensor:
    """The (T, ...) stack of α-scaled, trimmed task tensors in the "stacked" buffer."""
    count = math.prod(shape)
    stacked = workspace.get("stacked", (len(tasks), *shape), torch.float32)
    magnitude = workspace.get("magnitude", shape, torch.float32)
    keep = workspace.get("keep", shape, torch.bool)
    for index, task in enumerate(tasks):
        row = read(task, stacked[index])
        if scales is not None:
            row.mul_(scales[task])
        if count == 0:
            continue
        torch.abs(row, out=magnitude)
        if thresholds is not None:
            limit = thresholds[task]
        else:
            limit = kth_largest(magnitude, trim_count(count, density), workspace)
        row.mul_(torch.ge(magnitude, limit, out=keep))
    return stacked


def fused_sign_balance(
    tasks: Sequence[str],
    coefficient: Coefficient,
    shape: Sequence[int],
    read: Read,
    workspace: Workspace,
    *,
    thresholds: Mapping[str, float],
) -> int:
    """``ties.sign_balance`` of one tensor's globally trimmed sum: a pass toward the majority."""
    scales, _ = split_coefficient(coefficient, tasks)
    stacked = _fill_trimmed(tasks, scales, shape, read, workspace, 1.0, thresholds)
    summed = sum_rows(stacked, out=workspace.get("elected", shape, torch.float32))
    return sign_balance(summed)


def fused_ties(
    tasks: Sequence[str],
    coefficient: Coefficient,
    shape: Sequence[int],
    read: Read,
    workspace: Workspace,
    *,
    density: float,
    merge: str,
    thresholds: Mapping[str, float] | None,
    majority: float | None = None,
) -> Tensor:
    """TIES (trim, elect, disjoint merge) of one tensor; per-tensor trim unless ``thresholds``.

    ``majority`` (the whole backbone's, with ``thresholds``) fills zero sums; None takes this
    tensor's. Entries are zeroed by multiplying with a mask, so a zero may carry a minus sign
    where the method writes +0.0: equal values, every bit otherwise the same.
    """
    scales, lam = split_coefficient(coefficient, tasks)
    stacked = _fill_trimmed(tasks, scales, shape, read, workspace, density, thresholds)
    magnitude = workspace.get("magnitude", shape, torch.float32)
    keep = workspace.get("keep", shape, torch.bool)
    elected = sum_rows(stacked, out=workspace.get("elected", shape, torch.float32))
    if majority is None:
        majority = majority_of(sign_balance(elected))
    elected.sign_()
    elected.masked_fill_(torch.eq(elected, 0, out=keep), majority)
    total = workspace.get("total", shape, torch.float32)
    agreeing = workspace.get("agreeing", shape, torch.float32)
    for index in range(len(tasks)):
        row = stacked[index]
        agrees = torch.eq(torch.sign(row, out=magnitude), elected, out=keep)
        row.mul_(agrees)
        if merge == "max":
            row.abs_()
        if index == 0:
            total.copy_(row)
            agreeing.copy_(agrees)
            continue
        if merge == "max":
            torch.maximum(total, row, out=total)
        else:
            total.add_(row)
        agreeing.add_(agrees)
    if merge == "max":
        total.mul_(elected)
    elif merge == "mean":
        total.div_(agreeing.clamp_(min=1))
    base = read("", workspace.get("magnitude", shape, torch.float32))
    return total.mul_(lam).add_(base)


def global_thresholds_float32(
    tasks: Sequence[str],
    shapes: Sequence[Sequence[int]],
    read: Callable[[str, int, Tensor], Tensor],
    density: float,
    coefficient: Coefficient,
    workspace: Workspace,
) -> dict[str, float]:
    """``ties.global_trim_thresholds`` for float32 task vectors: two streamed passes, no copies.

    ``read(task, index, out)`` fills ``out`` with tensor ``index`` of that task. The same exact
    radix select over the float32 bit patterns of |α_t τ_t| (16 bits per pass).
    """
    scales, _ = split_coefficient(coefficient, tasks)
    sizes = {task: sum(math.prod(shape) for shape in shapes) for task in tasks}
    ranks = {task: trim_count(n, density) for task, n in sizes.items() if n > 0}
    digits: dict[str, int] = {}
    for high_pass in (True, False):
        counts = {task: torch.zeros(_BUCKETS, dtype=torch.int64) for task in ranks}
        for index, shape in enumerate(shapes):
            for task in ranks:
                row = read(task, index, workspace.get("row", shape, torch.float32))
                if scales is not None:
                    row.mul_(scales[task])
                bits = row.abs_().reshape(-1).view(torch.int32)
                high = workspace.get("high", bits.shape, torch.int32)
                torch.bitwise_right_shift(bits, 16, out=high)
                if not high_pass:  # the entries of the chosen high bucket, by their low bits
                    chosen = workspace.get("chosen", bits.shape, torch.bool)
                    high = bits[torch.eq(high, digits[task], out=chosen)] & (_BUCKETS - 1)
                counts[task] += torch.bincount(high, minlength=_BUCKETS)
        for task in ranks:
            digit, ranks[task] = _pick(counts[task], ranks[task])
            digits[task] = digit if high_pass else (digits[task] << 16) | digit
    found = {
        task: float(torch.tensor([digits[task]], dtype=torch.int32).view(torch.float32))
        for task in digits
    }
    return {task: found.get(task, 0.0) for task in tasks}

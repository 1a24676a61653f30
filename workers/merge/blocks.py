"""Large tensors merged in blocks of rows, bit for bit the whole tensor's result.

The fused kernels hold a few float32 buffers of the tensor they merge (ties: one per task).
A tensor larger than :data:`BLOCK_BYTES` in float32 whose sources read rows (``read_rows``,
as :class:`storage.shards.SafetensorsReader` does) is merged a block of rows at a time instead:
elementwise steps are the same on every entry, a per-tensor trim's exact threshold comes from
the radix select's histograms added up over the blocks, and the ties sums run task by task
(``ties.sum_rows``), so no result depends on the blocks. Memory is a few blocks, whatever the
size of the largest tensor (an LLM's embedding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from storage.errors import MergeInputError
from workers.merge.kernels import (
    Workspace,
    fused_linear,
    fused_sign_balance,
    fused_ties,
    global_thresholds_float32,
)
from workers.merge.plan import MergePlan, TensorSource, TensorSpec
from workers.merge.ties import majority_of

#: Float32 bytes of the blocks of rows an elementwise merge of a larger tensor works in.
BLOCK_BYTES = 64 * 2**20


def read_float32(
    source: TensorSource, name: str, dtype: torch.dtype, out: Tensor, workspace: Workspace
) -> Tensor:
    """Tensor ``name`` (stored as ``dtype``) into the float32 buffer ``out``: read straight in,
    or read into the workspace's ``raw`` slot and converted (exact for half precision)."""
    if dtype == out.dtype:
        return source.read(name, out=out)
    return out.copy_(source.read(name, out=workspace.get("raw", out.shape, dtype)))


def row_blocks(spec: TensorSpec, sources: Sequence[object]) -> list[tuple[int, int]] | None:
    """Row ranges of at most :data:`BLOCK_BYTES` (in float32) covering ``spec``, when it is
    larger than that and every source reads rows (``read_rows``); else None (whole tensor)."""
    if not spec.shape or math.prod(spec.shape) * 4 <= BLOCK_BYTES:
        return None
    if not all(hasattr(source, "read_rows") for source in sources):
        return None
    rows = spec.shape[0]
    step = max(1, BLOCK_BYTES // (4 * max(1, math.prod(spec.shape[1:]))))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def read_rows_float32(
    source: Any,
    name: str,
    dtype: torch.dtype,
    rows: tuple[int, int],
    out: Tensor,
    workspace: Workspace,
) -> Tensor:
    """:func:`read_float32` of rows ``rows`` of tensor ``name``."""
    start, stop = rows
    if dtype == out.dtype:
        return source.read_rows(name, start, stop, out=out)
    raw = source.read_rows(name, start, stop, out=workspace.get("raw", out.shape, dtype))
    return out.copy_(raw)


def block_reader(
    plan: MergePlan,
    spec: TensorSpec,
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
    workspace: Workspace,
    rows: tuple[int, int],
) -> Callable[[str, Tensor], Tensor]:
    """A kernel's ``read(task, out)`` of rows ``rows`` of ``spec`` ("" reads θ0), in float32."""

    def read(task: str, out: Tensor) -> Tensor:
        source = tasks[task] if task else base
        dtype = plan.task_dtypes[task][spec.name] if task else spec.dtype
        return read_rows_float32(source, spec.name, dtype, rows, out, workspace)

    return read


def linear_by_rows(
    form: Any,
    plan: MergePlan,
    spec: TensorSpec,
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
    workspace: Workspace,
    blocks: list[tuple[int, int]],
) -> Tensor:
    """The linear kernel over blocks of rows: the same operations on every entry, so the result
    is the whole tensor's bit for bit, with buffers of one block."""
    merged = torch.empty(spec.shape, dtype=spec.dtype)
    for start, stop in blocks:
        shape = (stop - start, *spec.shape[1:])
        read = block_reader(plan, spec, base, tasks, workspace, (start, stop))
        block = fused_linear(form, plan.tasks, plan.coefficient, shape, read, workspace)
        check_finite(block, spec.name, plan.tasks, base, tasks)
        merged[start:stop].copy_(block)
    return merged


def ties_by_rows(
    plan: MergePlan,
    spec: TensorSpec,
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
    workspace: Workspace,
    blocks: list[tuple[int, int]],
    params: Any,
    thresholds: Mapping[str, float] | None,
    majority: float | None,
) -> Tensor:
    """The ties kernel over blocks of rows, bit for bit the whole tensor's: a per-tensor trim
    finds each task's exact threshold by the radix select over the blocks (two passes), a
    per-tensor election adds up the blocks' sign balances (one pass), then each block is
    trimmed, elected and merged with those. Sums run task by task, so blocks do not change
    them."""

    def reader(rows: tuple[int, int]) -> Callable[[str, Tensor], Tensor]:
        return block_reader(plan, spec, base, tasks, workspace, rows)

    def shape(rows: tuple[int, int]) -> tuple[int, ...]:
        return (rows[1] - rows[0], *spec.shape[1:])

    if thresholds is None:  # the per-tensor trim: this tensor's k-th largest |α_t τ_t|
        thresholds = global_thresholds_float32(
            plan.tasks,
            [shape(rows) for rows in blocks],
            lambda task, index, out: reader(blocks[index])(task, out),
            params.density,
            plan.coefficient,
            workspace,
        )
    if majority is None:
        balance = sum(
            fused_sign_balance(
                plan.tasks,
                plan.coefficient,
                shape(rows),
                reader(rows),
                workspace,
                thresholds=thresholds,
            )
            for rows in blocks
        )
        majority = majority_of(balance)
    merged = torch.empty(spec.shape, dtype=spec.dtype)
    for rows in blocks:
        block = fused_ties(
            plan.tasks,
            plan.coefficient,
            shape(rows),
            reader(rows),
            workspace,
            density=params.density,
            merge=params.merge,
            thresholds=thresholds,
            majority=majority,
        )
        check_finite(block, spec.name, plan.tasks, base, tasks)
        merged[rows[0] : rows[1]].copy_(block)
    return merged


def pieces(
    plan: MergePlan, sources: Sequence[object], specs: Sequence[TensorSpec] | None = None
) -> list[tuple[str, tuple[int, int] | None, tuple[int, ...]]]:
    """(name, rows or None for the whole tensor, shape) of every piece a pass reads: the
    tensors of ``specs`` (default the plan's), a large one in blocks of rows."""
    pieces: list[tuple[str, tuple[int, int] | None, tuple[int, ...]]] = []
    for spec in plan.tensors if specs is None else specs:
        blocks = row_blocks(spec, sources)
        if blocks is None:
            pieces.append((spec.name, None, spec.shape))
            continue
        pieces += [(spec.name, rows, (rows[1] - rows[0], *spec.shape[1:])) for rows in blocks]
    return pieces


def check_finite(
    merged: Tensor,
    name: str,
    order: Sequence[str],
    base: TensorSource,
    tasks: Mapping[str, TensorSource],
) -> None:
    """NaN/Inf in any input reaches a fused result; a finite sum rules them out in one cheap
    pass, else the inputs are re-read to say which one holds them."""
    if not torch.isfinite(merged.sum()) and not bool(torch.isfinite(merged).all()):
        raise MergeInputError(non_finite_source(name, order, base, tasks))


def non_finite_source(
    name: str, order: Sequence[str], base: TensorSource, tasks: Mapping[str, TensorSource]
) -> str:
    """The error path only: re-read the inputs of ``name`` to say which one holds NaN/Inf."""
    for task in order:
        if not bool(torch.isfinite(tasks[task].read(name)).all()):
            return (
                f"task vector '{task}' tensor '{name}' holds NaN/Inf values (a diverged "
                "fine-tune produces these): rebuild that task vector from finite weights"
            )
    return (
        f"base tensor '{name}' holds NaN/Inf values (or the merge overflowed): "
        "check the base model's weights"
    )

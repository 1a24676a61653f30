"""A merge planned from file readers and streamed into writers, one tensor at a time.

The pure engine (``workers.merge.engine``) meets the file readers and the writer
(``storage.shards``) here, for both users of a streamed merge: ``mergeline merge`` on model
files (``pipelines.commands.merge_files``) and the publish stage. θ0 and each task vector are
read tensor by tensor; an adapter task vector computes each ΔW = s·B·A when it is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from storage.shards import SafetensorsReader, TensorInfo, TensorView
from workers.adapters.factors import Factor, LoraDelta
from workers.merge.backbone import Coefficient
from workers.merge.engine import (
    MergePlan,
    TensorSource,
    TensorSpec,
    election_majority,
    merge_stream,
    plan_merge,
    trim_thresholds,
)


class AdapterReader:
    """An adapter task vector read like a task-vector file: under every name of the base, ΔW =
    s·B·A where an adapter sits (computed when read, one tensor at a time), zeros elsewhere.

    ``base`` is a reader's ``tensors`` (names, dtypes, shapes); no tensor of it is read.
    """

    def __init__(self, factors: Mapping[str, Factor], base: Mapping[str, TensorInfo]) -> None:
        self.delta = LoraDelta(factors, base)
        self.tensors = {
            name: TensorSpec(name, dtype, shape) for name, dtype, shape in self.delta.specs()
        }

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.delta.read(name, out=out)

    def close(self) -> None:
        """The factors are in memory: nothing to close."""


TaskReader = SafetensorsReader | TensorView | AdapterReader


def reader_specs(reader: TaskReader | LoraDelta) -> list[TensorSpec]:
    """A reader's tensor specs: a file's header, or an adapter's ΔW names and shapes."""
    if isinstance(reader, LoraDelta):
        return [TensorSpec(name, dtype, tuple(shape)) for name, dtype, shape in reader.specs()]
    return [TensorSpec(i.name, i.dtype, i.shape) for i in reader.tensors.values()]


@dataclass(frozen=True)
class StreamedMerge:
    """A planned merge whose global ties statistics (if any) are computed: :meth:`tensors`
    yields the merged backbone in the plan's order, each tensor valid until the next."""

    plan: MergePlan
    base: TensorSource
    tasks: Mapping[str, TensorSource]
    thresholds: dict[str, float] | None
    majority: float | None
    statistics: Mapping[str, Mapping[str, torch.Tensor]] | None = None

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of the merged tensors, as a writer takes them."""
        return [(s.name, s.dtype, s.shape) for s in self.plan.tensors]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return merge_stream(
            self.plan,
            self.base,
            self.tasks,
            thresholds=self.thresholds,
            majority=self.majority,
            reuse_buffers=True,
            statistics=self.statistics,
        )


def start_merge(
    method: str,
    base: SafetensorsReader | TensorView,
    tasks: Mapping[str, TaskReader | LoraDelta],
    coefficient: Coefficient = 1.0,
    params: Mapping[str, Any] | None = None,
    statistics: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> StreamedMerge:
    """Plan the merge from the readers' headers and run the global passes it needs."""
    plan = plan_merge(
        method,
        reader_specs(base),
        {task: reader_specs(reader) for task, reader in tasks.items()},
        coefficient,
        params,
    )
    thresholds = trim_thresholds(plan, tasks)
    majority = election_majority(plan, tasks, thresholds)
    return StreamedMerge(plan, base, tasks, thresholds, majority, statistics)

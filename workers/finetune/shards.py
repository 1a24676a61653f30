"""Training state split over ranks, as each rank holds it and as a resumed run reads it back.

Every trained parameter is seen flattened: a rank holds the elements ``[start, stop)`` of its
fp32 weights (tensor ``"<parameter>"``) and of each optimizer tensor of the same size
(``"<parameter>/<key>"``, e.g. Adam's ``exp_avg``). The ranges of the ranks are disjoint and
cover the parameter: ZeRO's own partitions where DeepSpeed partitions, an even split of the
replicated state elsewhere. A checkpoint stores each rank's part as that rank wrote it, and
:class:`ShardedState` reads any range back slice by slice from the parts that overlap it, so a
run resumes on any number of workers without one process ever loading every part at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from storage.errors import ArtifactError

Range = tuple[int, int]
#: One rank's tensors, loaded when first asked for (a stored file is read only if needed).
PartLoader = Callable[[], Mapping[str, Tensor]]


def even_range(numel: int, rank: int, world_size: int) -> Range:
    """Rank ``rank``'s share of ``numel`` elements split as ZeRO-3 splits a parameter:
    ``ceil(numel / world_size)`` each, the last ones shorter or empty."""
    size = math.ceil(numel / world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


@dataclass(frozen=True)
class RankShard:
    """One rank's part of the trained state (see the module docstring): flat fp32 slices."""

    rank: int
    world_size: int
    shapes: dict[str, tuple[int, ...]]
    ranges: dict[str, Range]
    tensors: dict[str, Tensor]  # "<parameter>" and "<parameter>/<optimizer key>", 1-D

    @property
    def optimizer_keys(self) -> list[str]:
        return sorted({name.rpartition("/")[2] for name in self.tensors if "/" in name})


class ShardedState:
    """The trained state of every rank of a run, read range by range.

    ``ranges[r]`` says what rank ``r`` holds; ``parts[r]`` loads its tensors (weights and
    optimizer apart, so that a reader of weights never loads optimizer state).
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        ranges: list[dict[str, Range]],
        weight_parts: list[PartLoader],
        optimizer_parts: list[PartLoader],
        optimizer_keys: list[str],
    ) -> None:
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.ranges = ranges
        self.optimizer_keys = list(optimizer_keys)
        self._parts = {"weights": weight_parts, "optimizer": optimizer_parts}
        self._loaded: dict[tuple[str, int], Mapping[str, Tensor]] = {}
        for name, shape in self.shapes.items():
            check_cover(name, math.prod(shape), [r.get(name, (0, 0)) for r in ranges])

    @classmethod
    def of(cls, shard: RankShard) -> ShardedState:
        """The state of a one-rank run, straight from its (only) shard."""
        if shard.world_size != 1:
            raise ValueError(f"rank {shard.rank} of {shard.world_size} holds only its own part")
        weights = {n: t for n, t in shard.tensors.items() if "/" not in n}
        optimizer = {n: t for n, t in shard.tensors.items() if "/" in n}
        return cls(
            shard.shapes,
            [shard.ranges],
            [lambda: weights],
            [lambda: optimizer],
            shard.optimizer_keys,
        )

    @property
    def world_size(self) -> int:
        return len(self.ranges)

    def read(self, name: str, start: int, stop: int, key: str | None = None) -> Tensor:
        """Elements ``[start, stop)`` of parameter ``name`` flattened (its weights, or its
        optimizer tensor ``key``), fp32, assembled from the ranks that hold them."""
        out = torch.empty(stop - start, dtype=torch.float32)
        kind, tensor = ("weights", name) if key is None else ("optimizer", f"{name}/{key}")
        for rank, held in enumerate(self.ranges):
            first, last = held.get(name, (0, 0))
            low, high = max(first, start), min(last, stop)
            if low >= high:
                continue
            part = self._part(kind, rank)
            if tensor not in part:
                raise ArtifactError(f"rank {rank}'s part has no '{tensor}': rebuild the checkpoint")
            out[low - start : high - start] = part[tensor][low - first : high - first]
        return out

    def full(self, name: str, key: str | None = None) -> Tensor:
        """Parameter ``name``'s whole weights (or optimizer tensor ``key``) in its shape."""
        shape = self.shapes[name]
        return self.read(name, 0, math.prod(shape), key).reshape(shape)

    def weights(self) -> Mapping[str, Tensor]:
        """The trained weights by name, each assembled only when it is looked up."""
        return _Weights(self)

    def _part(self, kind: str, rank: int) -> Mapping[str, Tensor]:
        if (kind, rank) not in self._loaded:
            self._loaded[kind, rank] = self._parts[kind][rank]()
        return self._loaded[kind, rank]


class _Weights(Mapping[str, Tensor]):
    def __init__(self, state: ShardedState) -> None:
        self._state = state

    def __getitem__(self, name: str) -> Tensor:
        return self._state.full(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.shapes)

    def __len__(self) -> int:
        return len(self._state.shapes)


def check_cover(name: str, numel: int, ranges: list[Range]) -> None:
    """Raise unless the non-empty ``ranges`` are disjoint and cover ``[0, numel)``."""
    covered = 0
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if start != covered:
            break
        covered = stop
    else:
        if covered == numel:
            return
    raise ArtifactError(
        f"the ranks' parts of '{name}' do not cover its {numel} elements exactly ({ranges}): "
        "delete the checkpoint to start this fine-tune over"
    )

"""A :class:`~workers.finetune.engine.TrainState` as files: safetensors for tensors, JSON for the
rest. Never pickle.

A checkpoint of an ``N``-worker run holds, per rank ``r``, the part of the fp32 weights and of
the optimizer state that rank holds (:mod:`workers.finetune.shards`), written by that rank:
``weights-rank-<r>-of-<N>.safetensors`` and ``optimizer-rank-<r>-of-<N>.safetensors``, flat
slices under the parameter's name (``"<parameter>"``, ``"<parameter>/<key>"``). Rank 0 adds the
index, ``state.json`` (the world size, each parameter's shape, the range each rank holds, the
step count, the optimizer's hyperparameters, the LR scheduler's and loss scaler's state), and
``rng.safetensors``; the store's manifest, written after every rank's files, makes it visible.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from storage.errors import ArtifactError
from storage.staged import TensorFile
from storage.tensors import bytes_to_tensors
from workers.finetune.engine import TrainState
from workers.finetune.shards import Range, RankShard, ShardedState

#: Bumped when the meaning of a checkpoint's files changes; older checkpoints are ignored (2:
#: per-rank parts; 1 held the weights and optimizer state consolidated on rank 0).
CHECKPOINT_FORMAT = 2
RNG_FILE, STATE_FILE = "rng.safetensors", "state.json"


def part_name(kind: str, rank: int, world_size: int) -> str:
    """The file of rank ``rank``'s ``kind`` ("weights" or "optimizer")."""
    return f"{kind}-rank-{rank:05d}-of-{world_size:05d}.safetensors"


def rank_files(state: TrainState) -> dict[str, TensorFile]:
    """The files this rank writes: its part of the weights and of the optimizer state."""
    shard = state.shards
    if not isinstance(shard, RankShard):
        raise TypeError("rank_files takes the state a rank's on_checkpoint got")
    weights = {n: t for n, t in shard.tensors.items() if "/" not in n}
    optimizer = {n: t for n, t in shard.tensors.items() if "/" in n}
    return {
        part_name("weights", shard.rank, shard.world_size): TensorFile(weights),
        part_name("optimizer", shard.rank, shard.world_size): TensorFile(optimizer),
    }


def index_files(
    state: TrainState, ranges: list[dict[str, Range]], meta: dict[str, Any]
) -> dict[str, bytes | TensorFile]:
    """The files rank 0 writes besides its part: ``ranges[r]`` is what rank ``r`` holds (each
    rank's ``state.shards.ranges``); ``meta`` (JSON-able) says what produced the checkpoint."""
    shard = state.shards
    if not isinstance(shard, RankShard):
        raise TypeError("index_files takes the state a rank's on_checkpoint got")
    document = {
        "format": CHECKPOINT_FORMAT,
        "world_size": shard.world_size,
        "shapes": {name: list(shape) for name, shape in shard.shapes.items()},
        "ranges": [{name: list(held) for name, held in part.items()} for part in ranges],
        "optimizer_keys": shard.optimizer_keys,
        "step": state.step,
        "history": state.history,
        "optimizer_info": state.optimizer_info,
        "step_state": state.step_state,
        "meta": meta,
    }
    return {
        RNG_FILE: TensorFile(state.rng),
        STATE_FILE: json.dumps(document, sort_keys=True).encode(),
    }


def encode_state(state: TrainState, meta: dict[str, Any]) -> dict[str, bytes | TensorFile]:
    """Every file of a one-worker run's checkpoint."""
    shard = state.shards
    if not isinstance(shard, RankShard) or shard.world_size != 1:
        raise ValueError(
            "encode_state writes a one-worker checkpoint: use rank_files and "
            "index_files with several workers"
        )
    return rank_files(state) | index_files(state, [shard.ranges], meta)


def checkpoint_format(files: Mapping[str, Any]) -> int | None:
    """The format of a checkpoint's files (None: no readable ``state.json``)."""
    try:
        return json.loads(files[STATE_FILE]).get("format")
    except (KeyError, ValueError, AttributeError):
        return None


def decode_state(files: Mapping[str, Any], where: str) -> tuple[TrainState, dict[str, Any]]:
    """Inverse of the files above: the state of every rank, and the meta.

    ``files`` maps names to bytes or to objects with a ``tensors`` attribute
    (:class:`~storage.staged.TensorFile`, or a stored file read only when it is looked up):
    a rank's part is read only when a range of it is needed.
    """
    try:
        document = json.loads(files[STATE_FILE])
    except (KeyError, ValueError) as error:
        raise ArtifactError(f"{where}: no readable {STATE_FILE} ({error})") from None
    if document.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(
            f"{where}: checkpoint format {document.get('format')} is not {CHECKPOINT_FORMAT}: "
            "delete the checkpoint to start this fine-tune over"
        )
    world_size = int(document["world_size"])
    names = {
        kind: [part_name(kind, rank, world_size) for rank in range(world_size)]
        for kind in ("weights", "optimizer")
    }
    missing = [name for group in names.values() for name in group if name not in files]
    if missing:
        raise ArtifactError(f"{where}: the checkpoint has no {missing[0]}: delete it")

    def loader(name: str):
        return lambda: _tensors(files[name], f"{where}/{name}")

    shards = ShardedState(
        {name: tuple(shape) for name, shape in document["shapes"].items()},
        [{name: (int(a), int(b)) for name, (a, b) in part.items()} for part in document["ranges"]],
        [loader(name) for name in names["weights"]],
        [loader(name) for name in names["optimizer"]],
        document["optimizer_keys"],
    )
    state = TrainState(
        step=int(document["step"]),
        history=list(document["history"]),
        shards=shards,
        optimizer_info=document["optimizer_info"],
        rng=_tensors(files[RNG_FILE], where),
        step_state=document.get("step_state", {}),
    )
    return state, document.get("meta", {})


def _tensors(file: Any, where: str) -> Mapping[str, Any]:
    return bytes_to_tensors(file, where) if isinstance(file, bytes) else file.tensors

"""A :class:`~workers.finetune.engine.TrainState` as files: safetensors for tensors, JSON for the
rest. Never pickle: optimizer state is flattened per parameter (``"<parameter>/<key>"``) into
safetensors, its hyperparameters, the step count and the LR scheduler's and loss scaler's state
go to JSON.
"""

from __future__ import annotations

import json
from typing import Any

from storage.errors import ArtifactError
from storage.staged import TensorFile
from storage.tensors import bytes_to_tensors
from workers.finetune.engine import TrainState

#: Bumped when the meaning of a checkpoint's files changes; older checkpoints are ignored.
CHECKPOINT_FORMAT = 1
TENSOR_FILES = {"model": "model.safetensors", "optimizer": "optimizer.safetensors"}
RNG_FILE, STATE_FILE = "rng.safetensors", "state.json"


def encode_state(state: TrainState, meta: dict[str, Any]) -> dict[str, bytes | TensorFile]:
    """The files of one checkpoint; ``meta`` (JSON-able) says what produced it."""
    document = {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "history": state.history,
        "optimizer_info": state.optimizer_info,
        "step_state": state.step_state,
        "meta": meta,
    }
    return {
        TENSOR_FILES["model"]: TensorFile(state.model),
        TENSOR_FILES["optimizer"]: TensorFile(state.optimizer),
        RNG_FILE: TensorFile(state.rng),
        STATE_FILE: json.dumps(document, sort_keys=True).encode(),
    }


def decode_state(
    files: dict[str, bytes | TensorFile], where: str
) -> tuple[TrainState, dict[str, Any]]:
    """Inverse of :func:`encode_state`: the state and its meta."""
    try:
        document = json.loads(files[STATE_FILE])
    except (KeyError, ValueError) as error:
        raise ArtifactError(f"{where}: no readable {STATE_FILE} ({error})") from None
    if document.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(
            f"{where}: checkpoint format {document.get('format')} is not {CHECKPOINT_FORMAT}: "
            "delete the checkpoint to start this fine-tune over"
        )
    model = _tensors(files[TENSOR_FILES["model"]], where)
    optimizer = _tensors(files[TENSOR_FILES["optimizer"]], where)
    rng = _tensors(files[RNG_FILE], where)
    state = TrainState(
        step=int(document["step"]),
        history=list(document["history"]),
        model=model,
        optimizer=optimizer,
        optimizer_info=document["optimizer_info"],
        rng=rng,
        step_state=document.get("step_state", {}),  # none before LR schedules existed
    )
    return state, document.get("meta", {})


def _tensors(file: bytes | TensorFile, where: str) -> dict[str, Any]:
    return file.tensors if isinstance(file, TensorFile) else bytes_to_tensors(file, where)

"""Tensor (de)serialisation: safetensors only, never pickle.

Model-sized tensors travel as files (:class:`storage.staged.TensorFile` to write them) and are
read back with :func:`load_tensor_file`, memory-mapped, never as one ``bytes``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from storage.errors import ArtifactError


def tensors_to_bytes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    return save(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata
    )


def bytes_to_tensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ArtifactError(f"{what}: not a valid safetensors file ({error}): rebuild it") from None


def load_tensor_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a local safetensors file, memory-mapped copy-on-write: the file may be
    removed (or replaced) afterwards and the tensors may be modified in place."""
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ArtifactError(f"{what}: not a valid safetensors file ({error}): rebuild it") from None

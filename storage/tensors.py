"""Tensor (de)serialisation: safetensors only, never pickle.

Model-sized tensors travel as files: a :class:`TensorFile` is saved with ``save_file`` to a
local file that the store then streams (:func:`storage.artifacts.write_artifact`), and a stored
file is read back with :func:`load_tensor_file`, memory-mapped, never as one ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file

from storage.errors import ArtifactError


@dataclass(frozen=True)
class TensorFile:
    """The content of a safetensors file, given as its tensors: written by the store to a
    local file first, so it is never built as one ``bytes`` object."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] | None = None

    def save(self, path: str | Path) -> None:
        """Write the file; the bytes are exactly those of :func:`tensors_to_bytes`."""
        save_file(_on_cpu(self.tensors), str(path), metadata=self.metadata)


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def tensors_to_bytes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    return save(_on_cpu(tensors), metadata=metadata)


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

"""Tensor (de)serialisation: safetensors only, never pickle."""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

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

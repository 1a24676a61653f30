"""A published merged model's local directory: the names in it and their readers (no object
store, no service: :mod:`workers.models.merged` reads the directory through these).

``model.safetensors`` holds the backbone and each task's head as ``heads.<task>.<name>``
(:func:`merged_tensors`; the publish stage streams it into one file); a tall_masks model also
holds τ_MTL (``multi_task.safetensors``) and the bit-packed per-task masks
(``masks.safetensors``, named ``<task>/<name>``), the files of a TALL-mask artifact
(:mod:`storage.tall`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

MULTI_TASK = "multi_task.safetensors"
MASKS = "masks.safetensors"

Masks = dict[str, dict[str, torch.Tensor]]


def merged_tensors(
    backbone: dict[str, torch.Tensor], heads: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The merged-model layout: the backbone, then each head's tensors (``heads.<task>.<name>``)."""
    tensors = dict(backbone)
    for task, head in heads.items():
        tensors.update({f"heads.{task}.{k}": v for k, v in head.items()})
    return tensors


def split_merged_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Inverse of the merged-model layout: backbone tensors and ``heads.<task>.<name>``."""
    backbone: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("heads."):
            _, rest = name.split(".", 1)
            task, part = rest.rsplit(".", 1)
            heads.setdefault(task, {})[part] = tensor
        else:
            backbone[name] = tensor
    return backbone, heads


def split_masks(flat: dict[str, torch.Tensor]) -> Masks:
    """``{"<task>/<name>": packed}`` -> ``{task: {name: packed}}``."""
    masks: Masks = {}
    for key, packed in flat.items():
        task, name = key.split("/", 1)
        masks.setdefault(task, {})[name] = packed
    return masks


def read_tall_directory(directory: Path) -> tuple[dict[str, torch.Tensor], Masks] | None:
    """(τ_MTL, masks) from a local model directory, or None when it holds no masks."""
    if not (directory / MASKS).is_file():
        return None
    return load_file(str(directory / MULTI_TASK)), split_masks(load_file(str(directory / MASKS)))

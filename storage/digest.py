"""Content digests: the keys that make reruns cheap and lineage auditable."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_json(value: Any) -> str:
    """Digest of a JSON-able value, independent of key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(text.encode("utf-8"))


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """Digest of named arrays: names, dtypes, shapes and bytes, in name order."""
    hasher = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        if array.dtype.kind in "OUS":  # text: the UTF-8 of each string, length-prefixed
            hasher.update(f"{name}|text|{array.shape}|".encode())
            for value in array.reshape(-1):
                data = str(value).encode("utf-8")
                hasher.update(len(data).to_bytes(8, "little") + data)
            continue
        hasher.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()


def digest_state(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a state dict's names, dtypes, shapes and values."""
    hasher = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(
            tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        )
    return hasher.hexdigest()

"""Seeded input transformations that turn one image dataset into distinct task domains."""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.errors import DataError


def apply_transform(x: np.ndarray, transform: dict[str, Any], dataset: str) -> np.ndarray:
    kind = transform.get("kind", "none")
    if kind == "none":
        return x
    if kind == "permute":
        order = np.random.default_rng(int(transform.get("seed", 0))).permutation(x.shape[1])
        return np.ascontiguousarray(x[:, order])
    if kind == "invert":
        return np.ascontiguousarray(-x)  # inputs are standardised: invert about the mean
    side = int(round(np.sqrt(x.shape[1])))
    if side * side != x.shape[1]:
        raise DataError(f"transform {kind!r} needs square images; {dataset} rows are not")
    images = x.reshape(-1, side, side)
    if kind == "rot90":
        images = np.rot90(images, 1, axes=(1, 2))
    elif kind == "rot180":
        images = np.rot90(images, 2, axes=(1, 2))
    elif kind == "transpose":
        images = images.transpose(0, 2, 1)
    elif kind == "flip":
        images = images[:, :, ::-1]
    else:
        raise DataError(f"unknown transform {kind!r}")
    return np.ascontiguousarray(images.reshape(len(x), -1))

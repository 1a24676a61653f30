"""Deterministic train / val / test splits and the task dataset container."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.digest import digest_arrays
from storage.errors import DataError


@dataclass(frozen=True)
class Splits:
    """One task's data: float32 feature rows, or raw texts (an object array of strings) until
    the base model tokenizes them, with int64 labels in [0, num_classes); or prompt /
    completion pairs (an object array of shape (rows, 2): the prompt's messages as JSON, the
    completion text) for a causal language model, with zero labels and ``num_classes`` 0."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def digest(self) -> str:
        """Content digest (inputs, labels, number of classes): the same content gives the same
        digest wherever it comes from."""
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        return digest_arrays(arrays | {"num_classes": np.array(self.num_classes, np.int64)})

    @property
    def is_text(self) -> bool:
        """Raw texts (one string per row, or a prompt / completion pair), to be tokenized by the
        base model's tokenizer."""
        return self.x_train.dtype.kind in "OUS"

    @property
    def is_prompts(self) -> bool:
        """Prompt / completion pairs, to be rendered and tokenized by a causal LM's tokenizer."""
        return holds_prompts(self.x_train)

    @property
    def input_dim(self) -> int:
        """Features per row; 0 for raw texts (their width is the tokenizer's max_length)."""
        return 0 if self.is_text else int(np.prod(self.x_train.shape[1:]))

    def with_inputs(self, encode) -> Splits:
        """The same splits with every input array passed through ``encode`` (e.g. tokenize)."""
        return Splits(
            encode(self.x_train),
            self.y_train,
            encode(self.x_val),
            self.y_val,
            encode(self.x_test),
            self.y_test,
            self.num_classes,
        )

    @property
    def num_rows(self) -> int:
        return int(len(self.y_train) + len(self.y_val) + len(self.y_test))

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


_ARRAYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def holds_prompts(x: np.ndarray) -> bool:
    """Whether ``x`` is prompt / completion pairs: strings in two columns, not one."""
    return x.dtype.kind in "OUS" and x.ndim == 2 and x.shape[1] == 2


def split_validation(
    x: np.ndarray, y: np.ndarray, val_fraction: float, val_max: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``min(val_fraction * n, val_max)`` training examples for validation."""
    count = min(int(len(y) * val_fraction), val_max)
    if count < 1 or count >= len(y):
        raise DataError(
            f"{what}: {len(y)} training examples are too few for evaluation.val_fraction "
            f"{val_fraction}: use more data or a larger val_fraction"
        )
    order = np.random.default_rng(seed).permutation(len(y))
    val, train = order[:count], order[count:]
    return x[train], y[train], x[val], y[val]


def check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
    if len(y) == 0:
        raise DataError(f"{what}: the split is empty: check the dataset and its class filter")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(
            f"{what}: labels must lie in [0, {num_classes}); found {int(y.min())}..{int(y.max())}"
        )

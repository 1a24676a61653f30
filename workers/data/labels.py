"""The number of classes of a labelled dataset, bounded by its rows.

A head has one output per class, so one mistyped label (10**12 for 1) would size a head of
terabytes. A task cannot have more classes than labelled rows: a label beyond that is a data
error, reported with the file and the row it is on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.errors import DataError

Parts = dict[str, tuple[np.ndarray, np.ndarray]]


def count_classes(parts: Parts, origins: dict[str, Any], what: str) -> int:
    """``origins["num_classes"]`` if given, else the largest label + 1; either way at most the
    number of rows, and every label of every split in ``[0, num_classes)``.

    ``parts`` maps each split to its (inputs, labels) as read from its file, named by
    ``origins[split]``, so that a bad label is reported by file and row.
    """
    rows = sum(len(y) for _, y in parts.values())
    declared = origins.get("num_classes")
    if declared is not None:
        if int(declared) > rows:
            raise DataError(
                f"{what}.num_classes {declared} is more than the task's {rows} rows, so most "
                "classes could have no example: give the number of classes the labels use"
            )
        num_classes = int(declared)
    else:
        num_classes = _largest_label(parts, origins, what, rows) + 1
        if num_classes < 2:
            raise DataError(f"{what}: every label is 0: a task needs at least two classes")
    for split, (_, y) in parts.items():
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if len(bad):
            raise DataError(
                f"{what}.{split} {origins[split]}: labels must lie in [0, {num_classes}); "
                f"found {int(y.min())}..{int(y.max())} (row {int(bad[0])} has "
                f"{int(y[bad[0]])}, counting rows from 0)"
            )
    return num_classes


def _largest_label(parts: Parts, origins: dict[str, Any], what: str, rows: int) -> int:
    for split, (_, y) in parts.items():
        if y.min() < 0:
            row = int(np.argmin(y))
            raise DataError(
                f"{what}.{split} {origins[split]}: labels must be integers >= 0; found "
                f"{int(y[row])} (row {row}, counting from 0)"
            )
    split, (_, y) = max(parts.items(), key=lambda item: int(item[1][1].max()))
    row = int(np.argmax(y))
    largest = int(y[row])
    if largest >= rows:
        raise DataError(
            f"{what}.{split} {origins[split]}: row {row} (counting from 0) has label {largest}, "
            f"but the task has only {rows} rows, so it cannot have {largest + 1} classes: "
            "fix the label (a typo?) or number the classes 0..K-1"
        )
    return largest

"""The ``huggingface`` dataset source: examples from the Arrow tables ``datasets`` loaded.

The edge reads the tables (:mod:`storage.hubdata`; a Hub dataset by name needs network access
the first time, the packaged builders ``json``, ``csv`` and ``parquet`` over local
``data_files`` need none) and hands them here. Rows
become examples exactly as in the ``files`` source (the same columns, checks and digest), so
the same content gives the same cached task vectors whichever source reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from storage.errors import DataError
from workers.data.files import assemble_splits, columns_of, examples_from_table
from workers.data.sources import register_source
from workers.data.splits import Splits


@register_source("huggingface")
def load_hub(
    config: dict[str, Any],
    evaluation: dict[str, Any],
    what: str,
    contents: Mapping[str, Any] | None = None,
) -> Splits:
    """Examples from the Arrow table of each split (``contents``, read by
    :func:`storage.hubdata.read_hub_splits` at the edge: workers fetch nothing)."""
    path = config["path"]
    if contents is None:
        raise DataError(f"{what}: the {path!r} dataset was not read (the caller reads it)")
    columns = columns_of(config)
    names = {"train": config.get("train_split", "train"), "test": config.get("test_split", "test")}
    names["val"] = config.get("val_split")
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    origins: dict[str, str] = {}
    for split, table in contents.items():
        if config.get("max_examples"):
            table = table.slice(0, int(config["max_examples"]))
        origins[split] = f"{path}[{names[split]}]"
        parts[split] = examples_from_table(table, columns, f"{what}.{split} {origins[split]}")
    return assemble_splits(
        parts, origins | {"num_classes": config.get("num_classes")}, evaluation, what
    )

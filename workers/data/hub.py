"""The ``huggingface`` dataset source: splits through Hugging Face ``datasets``.

A Hub dataset by name needs network access the first time (``datasets`` caches it); the
packaged builders ``json``, ``csv`` and ``parquet`` over local ``data_files`` need none. Rows
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
    contents: Mapping[str, bytes] | None = None,
) -> Splits:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{what}: source 'huggingface' needs the datasets package: pip install datasets"
        ) from None
    path = config["path"]
    try:
        loaded = datasets.load_dataset(
            path,
            config.get("name"),
            revision=config.get("revision"),
            data_files=config.get("data_files"),
        )
    except Exception as error:  # offline, unknown name, bad files: one line, no traceback
        first = (str(error).splitlines() or [""])[0][:200]
        raise DataError(
            f"{what}: cannot load the Hugging Face dataset {path!r} ({type(error).__name__}: "
            f"{first})"
        ) from None
    wanted = {
        "train": config.get("train_split", "train"),
        "test": config.get("test_split", "test"),
        "val": config.get("val_split"),
    }
    columns = columns_of(config)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    origins: dict[str, str] = {}
    for split, name in wanted.items():
        if name is None:
            continue
        if name not in loaded:
            raise DataError(
                f"{what}.{split}_split: {path!r} has no split {name!r}; it has {sorted(loaded)}"
            )
        table = loaded[name].data.table
        if config.get("max_examples"):
            table = table.slice(0, int(config["max_examples"]))
        origins[split] = f"{path}[{name}]"
        parts[split] = examples_from_table(table, columns, f"{what}.{split} {origins[split]}")
    return assemble_splits(
        parts, origins | {"num_classes": config.get("num_classes")}, evaluation, what
    )

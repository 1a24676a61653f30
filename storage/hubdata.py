"""Reading a Hugging Face ``datasets`` dataset (the Hub, or a packaged builder over local files).

The ``huggingface`` dataset source names a dataset by Hub path (``glue``), or by a packaged
builder (``json``, ``csv``, ``parquet``) over ``data_files``. Fetching it is I/O, so it happens
here, at the edge; :mod:`workers.data.hub` turns the Arrow tables this returns into examples.
"""

from __future__ import annotations

from typing import Any

from storage.errors import DataError


def read_hub_splits(config: dict[str, Any], what: str) -> dict[str, Any]:
    """The Arrow table of each split a ``huggingface`` dataset spec asks for, by split
    (``train``, ``test``, and ``val`` when ``val_split`` is set); one-line errors."""
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
    tables = {}
    for split, name in wanted.items():
        if name is None:
            continue
        if name not in loaded:
            raise DataError(
                f"{what}.{split}_split: {path!r} has no split {name!r}; it has {sorted(loaded)}"
            )
        tables[split] = loaded[name].data.table
    return tables

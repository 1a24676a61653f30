"""Datasets at the edge: the files a dataset spec names are read here, then parsed by workers.

A ``files`` dataset names its train / val / test files by URI (a local path, ``file://`` or
``s3://``); :func:`storage.files.read_bytes` reads each one (a missing file is a one-line
:class:`~storage.errors.DataError` naming its URI) and :func:`workers.data.load_dataset`
parses the bytes, so workers never open a URI. A ``huggingface`` dataset is loaded here too
(:func:`storage.hubdata.read_hub_splits`) and its Arrow tables are parsed by workers. The
dataset digest hashes the parsed arrays: it does not depend on where the bytes came from.
"""

from __future__ import annotations

from typing import Any

from storage.files import read_bytes
from storage.hubdata import read_hub_splits
from workers.data import Splits
from workers.data import load_dataset as parse_dataset
from workers.data.files import split_uris


def read_dataset_files(config: dict[str, Any], what: str = "dataset") -> dict[str, Any]:
    """What the workers parse, by split: the bytes of each file of a ``files`` dataset, the
    Arrow table of each split of a ``huggingface`` one; {} for sources that read nothing."""
    if config.get("source") == "huggingface":
        return read_hub_splits(config, what)
    if config.get("source") != "files":
        return {}
    endpoint = config.get("endpoint_url")
    return {split: read_bytes(uri, endpoint) for split, uri in split_uris(config).items()}


def load_dataset(config: dict[str, Any], evaluation: dict[str, Any], what: str) -> Splits:
    """The dataset ``config`` describes (a plain dict, as it travels to Ray workers): its files
    read here, parsed by :func:`workers.data.load_dataset`."""
    return parse_dataset(config, evaluation, what, read_dataset_files(config, what))

"""Datasets at the edge: the files a dataset spec names are read here, then parsed by workers.

A ``files`` dataset names its train / val / test files by URI (a local path, ``file://`` or
``s3://``); :func:`storage.files.read_bytes` reads each one (a missing file is a one-line
:class:`~storage.errors.DataError` naming its URI) and :func:`workers.data.load_dataset`
parses the bytes, so workers never open a URI. The dataset digest hashes the parsed arrays:
it does not depend on where the bytes came from. Other sources need nothing read here.
"""

from __future__ import annotations

from typing import Any

from storage.files import read_bytes
from workers.data import Splits
from workers.data import load_dataset as parse_dataset
from workers.data.files import split_uris


def read_dataset_files(config: dict[str, Any]) -> dict[str, bytes]:
    """The bytes of each file a ``files`` dataset names, by split; {} for other sources."""
    if config.get("source") != "files":
        return {}
    endpoint = config.get("endpoint_url")
    return {split: read_bytes(uri, endpoint) for split, uri in split_uris(config).items()}


def load_dataset(config: dict[str, Any], evaluation: dict[str, Any], what: str) -> Splits:
    """The dataset ``config`` describes (a plain dict, as it travels to Ray workers): its files
    read here, parsed by :func:`workers.data.load_dataset`."""
    return parse_dataset(config, evaluation, what, read_dataset_files(config))

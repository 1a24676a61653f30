"""Datasets at the edge: the files a dataset spec names are read here, then parsed by workers.

A ``files`` dataset names its train / val / test files by URI (a local path, ``file://`` or
``s3://``); :func:`storage.files.read_bytes` reads each one (a missing file is a one-line
:class:`~storage.errors.DataError` naming its URI) and :func:`workers.data.load_dataset`
parses the bytes, so workers never open a URI. A ``huggingface`` dataset is loaded here too
(:func:`storage.hubdata.read_hub_splits`) and its Arrow tables are parsed by workers. The
dataset digest hashes the parsed arrays: it does not depend on where the bytes came from.

A ``sklearn`` dataset's bundled arrays are read through a local cache,
``$MERGELINE_CACHE/datasets/scikit-learn-<version>/<name>.npz`` (default ``~/.cache/mergeline``):
importing scikit-learn costs each process about 2 CPU-seconds, and every fine-tune job and
scorer of a run reads its tasks' data.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from importlib.metadata import version
from typing import Any

import numpy as np

from storage.files import read_bytes
from storage.hubdata import read_hub_splits
from storage.nodecache import cache_home
from workers.data import Splits
from workers.data import load_dataset as parse_dataset
from workers.data.files import split_uris
from workers.data.sources import SKLEARN_DATASETS, sklearn_bundle


def read_dataset_files(config: dict[str, Any], what: str = "dataset") -> dict[str, Any]:
    """What the workers parse, by split: the bytes of each file of a ``files`` dataset, the
    Arrow table of each split of a ``huggingface`` one, the arrays of a ``sklearn`` one; {} for
    sources that read nothing."""
    if config.get("source") == "huggingface":
        return read_hub_splits(config, what)
    if config.get("source") == "sklearn":
        return read_sklearn_bundle(str(config.get("name")), what)
    if config.get("source") != "files":
        return {}
    endpoint = config.get("endpoint_url")
    return {split: read_bytes(uri, endpoint) for split, uri in split_uris(config).items()}


def load_dataset(config: dict[str, Any], evaluation: dict[str, Any], what: str) -> Splits:
    """The dataset ``config`` describes (a plain dict, as it travels to Ray workers): its files
    read here, parsed by :func:`workers.data.load_dataset`."""
    return parse_dataset(config, evaluation, what, read_dataset_files(config, what))


def read_sklearn_bundle(name: str, what: str) -> dict[str, Any]:
    """A bundled scikit-learn dataset's raw arrays, from the local cache when it holds them
    (then scikit-learn is never imported). The cache is per scikit-learn version, written
    whole under a temporary name and renamed, so concurrent jobs never read half a file."""
    if name not in SKLEARN_DATASETS:
        return sklearn_bundle(name, what)  # the one-line DataError naming the known ones
    root = cache_home()
    path = root / "datasets" / f"scikit-learn-{version('scikit-learn')}" / f"{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {"data": stored["data"], "target": stored["target"]}
    # not cached yet, or unreadable: read it again
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass
    arrays = sklearn_bundle(name, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as out:
            np.savez(out, **arrays)
        os.replace(out.name, path)
    except OSError:  # a read-only cache only costs the import next time
        pass
    return arrays

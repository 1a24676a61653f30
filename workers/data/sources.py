"""Dataset sources, registered by name: each turns a dataset spec into :class:`Splits`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from storage.errors import DataError
from workers.data.splits import Splits, check_labels, split_validation
from workers.data.transforms import apply_transform

_POOL_SEED = 20_231_121  # fixed: the pretrain / tasks partition never depends on a spec
_STD_FLOOR = 0.1  # constant pixels (digits' borders) stay 0 instead of dividing by ~0


class DatasetSource(Protocol):
    def __call__(
        self,
        config: dict[str, Any],
        evaluation: dict[str, Any],
        what: str,
        contents: Mapping[str, Any] | None = None,
    ) -> Splits: ...


_SOURCES: dict[str, DatasetSource] = {}


def register_source(name: str) -> Callable[[DatasetSource], DatasetSource]:
    def decorator(function: DatasetSource) -> DatasetSource:
        if name in _SOURCES:
            raise RuntimeError(f"dataset source {name!r} is registered twice")
        _SOURCES[name] = function
        return function

    return decorator


def load_dataset(
    config: dict[str, Any],
    evaluation: dict[str, Any],
    what: str,
    contents: Mapping[str, Any] | None = None,
) -> Splits:
    """Materialise a dataset from its spec (a plain dict, as it travels to Ray workers).

    ``contents``: what the caller read, by split: the bytes of a ``files`` dataset's files, the
    Arrow tables of a ``huggingface`` one (workers fetch nothing):
    ``pipelines.stages.datasets.load_dataset`` reads them and calls this.
    """
    source = config.get("source")
    if source not in _SOURCES:
        raise DataError(f"{what}: unknown dataset source {source!r}; known: {sorted(_SOURCES)}")
    return _SOURCES[source](config, evaluation, what, contents)


#: scikit-learn's bundled datasets by name (files inside the package: nothing is downloaded)
SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")


def sklearn_bundle(name: str, what: str) -> dict[str, np.ndarray]:
    """The raw ``data`` and ``target`` arrays of a bundled scikit-learn dataset. Importing
    scikit-learn costs a process about 2 CPU-seconds, so the pipeline reads them through a
    local cache (``pipelines.stages.datasets``) and hands them to :func:`load_sklearn`."""
    if name not in SKLEARN_DATASETS:
        raise DataError(
            f"{what}: unknown sklearn dataset {name!r}; known: {sorted(SKLEARN_DATASETS)}"
        )
    import sklearn.datasets as bundled

    bunch = getattr(bundled, f"load_{name}")()
    return {"data": np.asarray(bunch.data), "target": np.asarray(bunch.target)}


def _sklearn_arrays(
    name: str, what: str, contents: Mapping[str, Any] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The standardised arrays of ``contents`` (a :func:`sklearn_bundle`) or scikit-learn's."""
    bunch = contents if contents and "data" in contents else sklearn_bundle(name, what)
    x = np.asarray(bunch["data"]).astype(np.float32)
    # Standardise each input with statistics of the fixed pretrain pool only (no task example
    # informs them). Centred inputs also keep permuted domains nearly orthogonal.
    reference = x[pool_indices(len(x), "pretrain", 0.4)]
    x = (x - reference.mean(axis=0)) / (reference.std(axis=0) + _STD_FLOOR)
    return x.astype(np.float32), np.asarray(bunch["target"]).astype(np.int64)


def pool_indices(count: int, pool: str, pretrain_fraction: float) -> np.ndarray:
    """Row indices of a fixed pool: 'pretrain' and 'tasks' are disjoint and cover 'all'."""
    order = np.random.default_rng(_POOL_SEED).permutation(count)
    cut = int(count * pretrain_fraction)
    if pool == "pretrain":
        return np.sort(order[:cut])
    if pool == "tasks":
        return np.sort(order[cut:])
    return np.arange(count)


@register_source("sklearn")
def load_sklearn(
    config: dict[str, Any],
    evaluation: dict[str, Any],
    what: str,
    contents: Mapping[str, Any] | None = None,
) -> Splits:
    """A scikit-learn bundled dataset, optionally one fixed pool, a class subset, a transform."""
    x, y = _sklearn_arrays(config["name"], what, contents)
    order = pool_indices(len(y), config.get("pool", "all"), config.get("pretrain_fraction", 0.4))
    x, y = x[order], y[order]

    classes = config.get("classes")
    if classes:
        present = set(np.unique(y).tolist())
        missing = [c for c in classes if c not in present]
        if missing:
            raise DataError(
                f"{what}: classes {missing} do not exist in {config['name']} "
                f"(it has {sorted(present)}): fix dataset.classes"
            )
        keep = np.isin(y, classes)
        remap = {c: i for i, c in enumerate(classes)}
        x, y = x[keep], np.array([remap[int(v)] for v in y[keep]], dtype=np.int64)
    num_classes = len(classes) if classes else int(y.max()) + 1

    x = apply_transform(x, config.get("transform") or {}, config["name"])
    seed = int(evaluation.get("split_seed", 0))
    test_order = np.random.default_rng(seed + 1).permutation(len(y))
    n_test = int(len(y) * config.get("test_fraction", 0.3))
    test, train = test_order[:n_test], test_order[n_test:]
    x_train, y_train, x_val, y_val = split_validation(
        x[train],
        y[train],
        float(evaluation.get("val_fraction", 0.1)),
        int(evaluation.get("val_max", 5000)),
        seed,
        what,
    )
    splits = Splits(x_train, y_train, x_val, y_val, x[test], y[test], num_classes)
    for name in ("train", "val", "test"):
        check_labels(splits.split(name)[1], num_classes, f"{what} ({name} split)")
    return splits

"""Write the nightly example's datasets as files, from scikit-learn's bundled digits (no download).

    python examples/make_nightly_data.py [OUT]            # default OUT: examples/nightly-data
    python examples/make_nightly_data.py --refresh digits-perm2 --version 2

Like the quickstart, each task is a fixed pixel permutation of the digits, and the base model
is pretrained on a disjoint half of the examples. Each dataset is written in another format:

    OUT/pretrain/{train,test}.parquet     unpermuted digits, column ``pixels`` (a list) + ``label``
    OUT/digits-perm1/{train,test}.csv     columns ``px0`` .. ``px63`` + ``label``
    OUT/digits-perm2/{train,test}.jsonl   one ``{"pixels": [...], "label": k}`` per line
    OUT/digits-perm3/{train,test}.npz     arrays ``x`` and ``y``

A task's train file holds a 90% sample of its training pool, drawn by ``--version`` (default
1). ``--refresh TASK --version N`` rewrites only that task's train file with sample N: the
nightly data refresh that makes the next run fine-tune that task alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits

DEFAULT_OUT = Path(__file__).resolve().parent / "nightly-data"
TASKS = {"digits-perm1": (1, "csv"), "digits-perm2": (2, "jsonl"), "digits-perm3": (3, "npz")}
SEED = 20_240_601  # fixes the pretrain / tasks halves and every task's train / test split
PRETRAIN_FRACTION = 0.4
TEST_FRACTION = 0.3
SAMPLE_FRACTION = 0.9


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pretrain x, pretrain y, tasks x, tasks y): pixels standardised with the pretrain half."""
    bunch = load_digits()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    cut = int(len(y) * PRETRAIN_FRACTION)
    pretrain, tasks = np.sort(order[:cut]), np.sort(order[cut:])
    mean, std = x[pretrain].mean(axis=0), x[pretrain].std(axis=0) + 0.1
    # 4 decimals, so that the text formats hold exactly the float32 values the binary ones do
    x = np.round((x - mean).astype(np.float64) / std, 4).astype(np.float32)
    return x[pretrain], y[pretrain], x[tasks], y[tasks]


def train_test(x: np.ndarray, y: np.ndarray, salt: int) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(SEED + salt).permutation(len(y))
    cut = int(len(y) * TEST_FRACTION)
    test, train = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def sample(x: np.ndarray, y: np.ndarray, salt: int, version: int) -> tuple[np.ndarray, ...]:
    keep = np.random.default_rng([SEED, salt, version]).permutation(len(y))
    keep = np.sort(keep[: int(len(y) * SAMPLE_FRACTION)])
    return x[keep], y[keep]


def write(path: Path, fmt: str, x: np.ndarray, y: np.ndarray) -> Path:
    """Write (x, y) to ``path`` in ``fmt`` through a temporary file (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pixels = [[round(float(v), 4) for v in row] for row in x]
    if fmt == "csv":
        header = ",".join([f"px{i}" for i in range(x.shape[1])] + ["label"])
        lines = [",".join([*map(str, row), str(int(t))]) for row, t in zip(pixels, y, strict=True)]
        partial.write_text("\n".join([header, *lines]) + "\n")
    elif fmt == "jsonl":
        lines = [
            json.dumps({"pixels": row, "label": int(t)}) for row, t in zip(pixels, y, strict=True)
        ]
        partial.write_text("\n".join(lines) + "\n")
    elif fmt == "parquet":
        pq.write_table(pa.table({"pixels": pixels, "label": y.tolist()}), partial)
    elif fmt == "npz":
        with open(partial, "wb") as handle:
            np.savez(handle, x=x, y=y)
    partial.replace(path)
    return path


def permute(x: np.ndarray, seed: int) -> np.ndarray:
    return np.ascontiguousarray(x[:, np.random.default_rng(seed).permutation(x.shape[1])])


def write_datasets(out: Path, only: list[str] | None = None, version: int = 1) -> list[Path]:
    """Write every dataset (or only the train files of the tasks in ``only``)."""
    x_pre, y_pre, x_tasks, y_tasks = digits()
    written = []
    if only is None:
        x_train, y_train, x_test, y_test = train_test(x_pre, y_pre, salt=0)
        written.append(write(out / "pretrain" / "train.parquet", "parquet", x_train, y_train))
        written.append(write(out / "pretrain" / "test.parquet", "parquet", x_test, y_test))
    for task, (seed, fmt) in TASKS.items():
        if only is not None and task not in only:
            continue
        x_train, y_train, x_test, y_test = train_test(permute(x_tasks, seed), y_tasks, salt=seed)
        x_train, y_train = sample(x_train, y_train, seed, version)
        written.append(write(out / task / f"train.{fmt}", fmt, x_train, y_train))
        if only is None:
            written.append(write(out / task / f"test.{fmt}", fmt, x_test, y_test))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--refresh", action="append", choices=sorted(TASKS), help="rewrite only this task"
    )
    parser.add_argument("--version", type=int, default=1, help="which train sample to write")
    args = parser.parse_args()
    for path in write_datasets(args.out, args.refresh, args.version):
        print(path)


if __name__ == "__main__":
    main()

"""Dataset sources, pools, splits, transforms and digests."""

from __future__ import annotations

import numpy as np
import pytest

from storage.errors import DataError
from workers.data import load_dataset
from workers.data.sources import pool_indices
from workers.data.transforms import apply_transform

EVAL = {"val_fraction": 0.1, "val_max": 5000, "split_seed": 0}
DIGITS = {"source": "sklearn", "name": "digits"}


def test_pretrain_and_task_pools_are_disjoint_and_cover_everything() -> None:
    pretrain = set(pool_indices(1797, "pretrain", 0.4).tolist())
    tasks = set(pool_indices(1797, "tasks", 0.4).tolist())
    assert not pretrain & tasks
    assert pretrain | tasks == set(range(1797))
    assert len(pretrain) == int(1797 * 0.4)


def test_splits_are_deterministic_disjoint_and_sized() -> None:
    a = load_dataset(DIGITS | {"pool": "tasks"}, EVAL, "t")
    b = load_dataset(DIGITS | {"pool": "tasks"}, EVAL, "t")
    assert a.digest() == b.digest()
    total = len(pool_indices(1797, "tasks", 0.4))
    assert a.num_rows == total
    assert len(a.y_test) == int(total * 0.3)
    assert len(a.y_val) == int((total - len(a.y_test)) * 0.1)
    other = load_dataset(DIGITS | {"pool": "tasks"}, EVAL | {"split_seed": 1}, "t")
    assert other.digest() != a.digest()


def test_val_max_caps_the_validation_split() -> None:
    data = load_dataset(DIGITS, EVAL | {"val_fraction": 0.5, "val_max": 10}, "t")
    assert len(data.y_val) == 10


def test_class_subset_is_remapped() -> None:
    data = load_dataset(DIGITS | {"classes": [7, 3]}, EVAL, "t")
    assert data.num_classes == 2
    assert set(np.unique(data.y_train)) == {0, 1}


def test_missing_classes_and_unknown_names_are_user_errors() -> None:
    with pytest.raises(DataError, match=r"classes \[42\] do not exist"):
        load_dataset(DIGITS | {"classes": [1, 42]}, EVAL, "tasks[0].dataset")
    with pytest.raises(DataError, match="unknown sklearn dataset"):
        load_dataset({"source": "sklearn", "name": "mnist"}, EVAL, "t")
    with pytest.raises(DataError, match="unknown dataset source"):
        load_dataset({"source": "ftp"}, EVAL, "t")


def test_split_too_small_for_the_validation_fraction() -> None:
    with pytest.raises(DataError, match="too few"):
        load_dataset({"source": "sklearn", "name": "iris"}, EVAL | {"val_fraction": 0.001}, "t")


def test_transforms_change_the_digest_and_are_permutations() -> None:
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    permuted = apply_transform(x, {"kind": "permute", "seed": 1}, "d")
    assert sorted(permuted[0].tolist()) == x[0].tolist() and not np.array_equal(permuted, x)
    rotated = x
    for _ in range(4):
        rotated = apply_transform(rotated, {"kind": "rot90"}, "d")
    assert np.array_equal(rotated, x)
    plain = load_dataset(DIGITS, EVAL, "t")
    moved = load_dataset(DIGITS | {"transform": {"kind": "permute", "seed": 1}}, EVAL, "t")
    assert plain.digest() != moved.digest()
    assert np.array_equal(plain.y_test, moved.y_test)


def test_a_bundled_dataset_is_read_from_the_local_cache_without_importing_sklearn(
    tmp_path, monkeypatch
) -> None:
    """The first read caches scikit-learn's arrays; later processes parse the same splits from
    the cache and never import scikit-learn (about 2 CPU-seconds in every job and scorer)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys, hashlib\n"
        "from pipelines.stages.datasets import load_dataset\n"
        "config = {'source': 'sklearn', 'name': 'wine', 'pool': 'tasks'}\n"
        "s = load_dataset(config, {'split_seed': 3}, 'task')\n"
        "arrays = (s.x_train, s.y_train, s.x_val, s.y_val, s.x_test, s.y_test)\n"
        "print(hashlib.sha256(b''.join(a.tobytes() for a in arrays)).hexdigest(),"
        " 'sklearn' in sys.modules)\n"
    )
    env = {"MERGELINE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def run() -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.split()

    first, second = run(), run()
    assert first[1] == "True" and second == [first[0], "False"]
    monkeypatch.setenv("MERGELINE_CACHE", str(tmp_path))
    direct = load_dataset(
        {"source": "sklearn", "name": "wine", "pool": "tasks"}, {"split_seed": 3}, "t"
    )
    cached = next(tmp_path.glob("datasets/scikit-learn-*/wine.npz"))
    cached.write_bytes(b"not a zip file")  # a damaged cache is read again, not trusted
    assert run() == [first[0], "True"] and run() == second
    from pipelines.stages.datasets import load_dataset as load_at_the_edge

    edge = load_at_the_edge(
        {"source": "sklearn", "name": "wine", "pool": "tasks"}, {"split_seed": 3}, "t"
    )
    assert np.array_equal(edge.x_train, direct.x_train) and np.array_equal(
        edge.y_test, direct.y_test
    )
    with pytest.raises(DataError, match="unknown sklearn dataset 'mnist'"):
        load_at_the_edge({"source": "sklearn", "name": "mnist"}, {}, "task 'a'")

"""Shared fixtures: small specs, a local Ray for the integration tier."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.stages.pause import ENVIRONMENT_VARIABLE
from tests.faults import Pause

pytest_plugins = ["tests.conftest_mlflow", "tests.conftest_s3"]

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The GPU tier runs only where CUDA is; elsewhere each of its tests is skipped, saying so
    (``make test-gpu`` refuses to run at all there)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `make test-gpu` on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: The run summary's keys: DESIGN.md's, plus ``started`` and ``spec`` (name, digest,
#: objective) that ``mergeline runs`` and the incremental rerun's reasons read back.
SUMMARY_KEYS = {
    "run_id",
    "status",
    "started",
    "spec",
    "mode",
    "tasks",
    "search",
    "best",
    "model",
    "timings",
}
TASK_KEYS = {"task_vector_uri", "sha256", "cache_hit", "rebuilt_reason", "zero_shot", "finetuned"}
#: How each task's vector was made in the run (engine, workers, attempts, resumed_from_step).
TASK_KEYS |= {"engine", "workers", "attempts", "resumed_from_step"}
SEARCH_KEYS = {"candidates_evaluated", "seconds", "strategy", "scores_reused", "scores_computed"}
BEST_KEYS = {"method", "params", "coefficients", "val", "test"}
MODEL_KEYS = {"uri", "mlflow_run_id", "registered_model", "version", "aliases", "promotion"}
TIMING_KEYS = {"finetune_s", "search_s", "total_s"}

TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "base_model": {
        "source": "builtin",
        "name": "mlp",
        "hidden": [32],
        "features": 8,
        "seed": 0,
        "pretrain": {
            "dataset": {"source": "sklearn", "name": "digits", "pool": "pretrain"},
            "steps": 60,
            "batch_size": 32,
            "lr": 3e-3,
        },
    },
    "tasks": [
        {
            "name": "perm1",
            "dataset": {
                "source": "sklearn",
                "name": "digits",
                "pool": "tasks",
                "transform": {"kind": "permute", "seed": 1},
            },
        },
        {
            "name": "perm2",
            "dataset": {
                "source": "sklearn",
                "name": "digits",
                "pool": "tasks",
                "transform": {"kind": "permute", "seed": 2},
            },
        },
    ],
    "finetune": {"steps": 30, "batch_size": 32, "lr": 1e-3},
    "merge": {
        "candidates": [
            {"method": "task_arithmetic", "coefficient": {"start": 0.0, "stop": 1.0, "num": 5}}
        ]
    },
}


@pytest.fixture
def tiny_spec(tmp_path: Path) -> dict[str, Any]:
    """A spec dict that runs the whole pipeline in seconds, storing under ``tmp_path``."""
    spec = copy.deepcopy(TINY_SPEC)
    spec["storage"] = {"uri": f"file://{tmp_path}/store"}
    spec["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny"}
    return spec


@pytest.fixture(scope="session")
def session_pause_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pause folder that the session's Ray workers see (:mod:`tests.faults`)."""
    return tmp_path_factory.mktemp("pause")


@pytest.fixture(scope="session")
def local_ray(session_pause_folder: Path):
    """One local Ray for the whole session (the pipeline reuses an initialised Ray).

    Its workers see the session's pause folder, inert until a test arms :func:`pause`. It keeps
    up to 6 worker processes (Ray's default is one per CPU, 2 here, and it ends idle ones above
    that within a second): each test's scorer actors would otherwise push the task workers out,
    and the next test would pay a fresh worker's imports (torch, transformers) again. Four
    integration files took 183 s alone, 94 s with the warm workers. Only the tests' Ray: a
    ``mergeline run`` keeps Ray's default, so idle workers never hold a large model's memory.
    """
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENVIRONMENT_VARIABLE, str(session_pause_folder))
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            configure_logging=False,
            _system_config={"num_workers_soft_limit": 6},
        )
    yield
    ray.shutdown()


@pytest.fixture
def pause(session_pause_folder: Path) -> Iterator[Pause]:
    """A :class:`~tests.faults.Pause` for fine-tunes in the session's Ray; released after."""
    held = Pause(session_pause_folder)
    yield held
    held.release()

"""Killed workers and killed drivers: a run survives both and does no work twice.

The worker test SIGKILLs the Ray worker process running a fine-tune (found by its process
title ``ray::run_finetune_job`` among this test's own descendants); the driver test SIGKILLs
``mergeline run`` during fine-tuning and runs the same command again.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.plan import make_plan
from pipelines.recovery import run_key
from pipelines.run import fingerprint_datasets, fingerprint_pretrain, run_pipeline
from pipelines.specfile import validate_document
from pipelines.stages.finetune import run_finetune_job
from storage.artifacts import find_artifact
from storage.objectstore import open_store
from storage.runstate import begin_run, read_run_state
from storage.taskvectors import base_model_prefix, read_task_vector
from tests.conftest import TASK_KEYS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 2000, 100


def _long_finetune(spec: dict, tasks: int) -> dict:
    """Long enough (wider model, bigger batches) that a kill lands mid-run on any machine."""
    spec = copy.deepcopy(spec)
    spec["tasks"] = spec["tasks"][:tasks]
    spec["base_model"]["hidden"] = [256, 256]
    spec["finetune"] |= {"steps": STEPS, "batch_size": 128, "checkpoint_every": EVERY}
    return spec


def _finetune_workers(root: int) -> list[psutil.Process]:
    """Processes below ``root`` whose title says they run a fine-tune task."""
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            if process.cmdline()[0].startswith("ray::run_finetune_job"):
                found.append(process)
        except (psutil.Error, IndexError):
            continue
    return found


def _checkpoint_steps(store: Path) -> list[int]:
    """Steps of the complete checkpoints (manifest written) in the store."""
    return sorted(
        int(path.parent.name.removeprefix("step-"))
        for path in (store / "checkpoints").glob("*/step-*/manifest.json")
    )


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.usefixtures("local_ray")
def test_a_killed_finetune_worker_resumes_from_its_checkpoint(
    tiny_spec: dict, tmp_path: Path
) -> None:
    spec = _long_finetune(tiny_spec, tasks=1)
    store = tmp_path / "store"
    killed: dict[str, int] = {}

    def kill_after_first_checkpoint() -> None:
        _wait_for(lambda: _checkpoint_steps(store), 300, "a first checkpoint")
        worker = _wait_for(lambda: _finetune_workers(os.getpid()), 30, "the fine-tune worker")[0]
        killed["seen_step"] = max(_checkpoint_steps(store))
        worker.send_signal(signal.SIGKILL)
        killed["pid"] = worker.pid

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = run_pipeline(validate_document(spec), Console(file=open(os.devnull, "w")))
    killer.join(timeout=5)
    assert "pid" in killed, "the fine-tune finished before the worker could be killed"

    task = summary["tasks"]["perm1"]
    assert set(task) == TASK_KEYS
    assert task["engine"] == "torch" and task["workers"] == 1
    assert task["attempts"] == 2
    resumed = task["resumed_from_step"]
    print(f"killed after checkpoint {killed['seen_step']}, resumed from step {resumed}")
    assert resumed >= killed["seen_step"] > 0
    # The killed attempt ran at most up to its next checkpoint; the retry ran the rest.
    assert resumed + EVERY + (STEPS - resumed) < 1.5 * STEPS
    assert list((store / "checkpoints").glob("*")) == []  # removed with the task vector

    # The resumed task vector is the one an uninterrupted fine-tune computes.
    resumed_delta = read_task_vector(open_store(f"file://{store}"), _key(task))[0]
    fresh_delta = _uninterrupted_delta(spec, store, _key(task), tmp_path / "fresh")
    assert set(resumed_delta) == set(fresh_delta)
    for name, value in fresh_delta.items():
        torch.testing.assert_close(resumed_delta[name], value, rtol=1e-5, atol=1e-6)


def _key(task: dict) -> str:
    return task["task_vector_uri"].rstrip("/").rsplit("/", 1)[-1]


def _uninterrupted_delta(spec: dict, store: Path, key: str, fresh: Path) -> dict:
    """Fine-tune the same task again, in this process, in a new store with the same base."""
    shutil.copytree(store / "base-models", fresh / "base-models")
    source, target = open_store(f"file://{store}"), open_store(f"file://{fresh}")
    assert find_artifact(source, f"task-vectors/{key}").meta["steps"] == STEPS
    base_key = next((fresh / "base-models").iterdir()).name
    base_meta = find_artifact(source, base_model_prefix(base_key)).meta
    plan = make_plan(validate_document(spec))
    task = plan.tasks[0]
    run_finetune_job(
        {"uri": target.uri},
        key,
        task.name,
        task.dataset,
        plan.evaluation,
        base_key,
        base_meta,
        plan.finetune,
    )
    return read_task_vector(target, key)[0]


def _mergeline(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """``mergeline ARGS`` as a user runs it, its output going to ``log``."""
    env = os.environ | {"COLUMNS": "120", "NO_COLOR": "1"}
    with log.open("w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )


def test_killing_the_driver_then_rerunning_resumes_the_same_run(
    tiny_spec: dict, tmp_path: Path
) -> None:
    spec = _long_finetune(tiny_spec, tasks=2)
    spec["compute"] = {"num_cpus": 1}  # one fine-tune at a time: one finishes, one is cut off
    spec["merge"]["num_actors"] = 1  # the one CPU holds one search actor
    spec["tracking"]["registered_model"] = "tiny-resume"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    store = tmp_path / "store"
    command = ["run", "spec.yaml", "--summary", "summary.json"]

    driver = _mergeline(command, tmp_path, tmp_path / "killed.log")
    try:
        _wait_for(
            lambda: list(store.glob("task-vectors/*/manifest.json")) and _checkpoint_steps(store),
            600,
            "one task vector and the other task's first checkpoint",
        )
        below = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        _, still_running = psutil.wait_procs(below, timeout=60)
        for process in still_running:  # Ray's own reaper normally ends them; never leak any
            process.kill()
    finally:
        if driver.poll() is None:
            driver.kill()
    interrupted = json.loads(next(store.glob("resume/*.json")).read_text())["run_id"]
    assert read_run_state(open_store(f"file://{store}"), interrupted)["status"] == "running"
    assert not (tmp_path / "summary.json").exists()

    rerun = _mergeline(command, tmp_path, tmp_path / "rerun.log")
    rerun.wait(timeout=900)
    output = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, output[-3000:]
    assert f"resuming run {interrupted}" in output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run_id"] == interrupted
    done, cut = (summary["tasks"][name] for name in ("perm1", "perm2"))
    assert done["cache_hit"] is True and done["attempts"] == 0
    assert cut["cache_hit"] is False and cut["resumed_from_step"] > 0 and cut["attempts"] == 2
    assert list(store.glob("resume/*.json")) == []
    assert read_run_state(open_store(f"file://{store}"), interrupted)["status"] == "succeeded"

    client = MlflowClient(spec["tracking"]["uri"])
    versions = client.search_model_versions(f"tags.`mergeline.run_id` = '{interrupted}'")
    assert [int(v.version) for v in versions] == [summary["model"]["version"]]


@pytest.mark.usefixtures("local_ray")
def test_publishing_an_interrupted_run_again_registers_no_second_version(
    tiny_spec: dict, tmp_path: Path
) -> None:
    """A driver killed after registering, before marking the run done: the rerun reuses it."""
    console = Console(file=open(os.devnull, "w"))
    first = run_pipeline(validate_document(tiny_spec), console)
    # What such a crash leaves behind: the run's resume pointer and a 'running' state.
    spec = validate_document(tiny_spec)
    plan = make_plan(spec)
    datasets = fingerprint_datasets(plan)
    digests = {name: data.digest() for name, data in datasets.items()}
    key = run_key(plan, digests, fingerprint_pretrain(plan, datasets))
    store = open_store(tiny_spec["storage"]["uri"])
    assert begin_run(store, key, first["run_id"]) == (first["run_id"], 2)

    again = run_pipeline(spec, console)
    assert again["run_id"] == first["run_id"]
    assert again["model"]["version"] == first["model"]["version"]
    assert set(again["model"]["aliases"]) >= set(first["model"]["aliases"])
    client = MlflowClient(tiny_spec["tracking"]["uri"])
    assert len(client.search_model_versions("name='tiny'")) == 1
    assert read_run_state(store, first["run_id"])["status"] == "succeeded"

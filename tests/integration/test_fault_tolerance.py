"""Killed workers and killed drivers: a run survives both and does no work twice.

Every kill is placed, not timed: a fine-tune is held at a pause right after a given checkpoint
(:mod:`tests.faults`), the test kills the worker (or the driver and the worker) while it sits
there, waits until they are gone, and only then lets anything go on.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from pipelines.run.fingerprint import fingerprint_datasets, fingerprint_pretrain
from pipelines.run.pipeline import run_pipeline
from pipelines.run.recovery import run_key
from pipelines.spec.load import validate_document
from pipelines.spec.plan import make_plan
from pipelines.spec.refs import BaseModelRef, DatasetRef
from pipelines.stages.finetune import run_finetune_job
from pipelines.stages.jobs import FinetuneJob
from storage.artifacts import find_artifact
from storage.objectstore import open_store
from storage.runstate import begin_run, read_run_state
from storage.taskvectors import base_model_prefix, read_task_vector
from tests.conftest import TASK_KEYS
from tests.faults import Pause, kill_and_wait, process_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 300, 100
#: The checkpoint after which the fine-tune is cut off.
CUT = 100


def _checkpointed(spec: dict, tasks: int) -> dict:
    spec = copy.deepcopy(spec)
    spec["tasks"] = spec["tasks"][:tasks]
    spec["finetune"] |= {"steps": STEPS, "checkpoint_every": EVERY}
    return spec


@pytest.mark.usefixtures("local_ray")
def test_a_killed_finetune_worker_resumes_from_its_checkpoint(
    tiny_spec: dict, tmp_path: Path, pause: Pause
) -> None:
    spec = _checkpointed(tiny_spec, tasks=1)
    store = tmp_path / "store"
    pause.arm(CUT, store=open_store(f"file://{store}").uri)
    killed: dict[str, int] = {}

    def kill_at_the_pause() -> None:
        held = pause.wait_until_reached()
        kill_and_wait([psutil.Process(held["pid"])])
        killed["pid"] = held["pid"]

    killer = threading.Thread(target=kill_at_the_pause, daemon=True)
    killer.start()
    summary = run_pipeline(validate_document(spec), Console(file=open(os.devnull, "w")))
    killer.join(timeout=60)
    assert "pid" in killed, "the fine-tune worker was never killed"

    task = summary["tasks"]["perm1"]
    assert set(task) == TASK_KEYS
    assert task["engine"] == "torch" and task["workers"] == 1
    assert (task["attempts"], task["resumed_from_step"]) == (2, CUT)
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
    base = BaseModelRef.from_artifact(base_key, find_artifact(target, base_model_prefix(base_key)))
    plan = make_plan(validate_document(spec))
    task = plan.tasks[0]
    dataset = DatasetRef(task.name, task.dataset)
    run_finetune_job(
        FinetuneJob({"uri": target.uri}, key, dataset, base, plan.finetune, plan.evaluation)
    )
    return read_task_vector(target, key)[0]


def _mergeline(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """``mergeline ARGS`` as a user runs it, its output going to ``log``."""
    env = os.environ | {"COLUMNS": "120", "NO_COLOR": "1"} | env
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
    spec = _checkpointed(tiny_spec, tasks=2)
    spec["compute"] = {"num_cpus": 1}  # one fine-tune at a time: one finishes, one is cut off
    spec["merge"]["num_actors"] = 1  # the one CPU holds one search actor
    spec["tracking"]["registered_model"] = "tiny-resume"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    store = tmp_path / "store"
    command = ["run", "spec.yaml", "--summary", "summary.json"]
    pause = Pause(tmp_path / "pause")
    pause.arm(CUT, nth=2)  # the second fine-tune, whichever task Ray runs second

    driver = _mergeline(command, tmp_path, tmp_path / "killed.log", **pause.environment)
    try:
        held = pause.wait_until_reached(alive=lambda: driver.poll() is None)
        assert len(list(store.glob("task-vectors/*/manifest.json"))) == 1
        started = process_tree(driver.pid)  # the driver, its Ray and the held worker
        # The driver and the held worker first, then what is left of the driver's Ray.
        kill_and_wait([psutil.Process(driver.pid), psutil.Process(held["pid"])])
        kill_and_wait(started)
    finally:
        if driver.poll() is None:
            driver.kill()
    interrupted = json.loads(next(store.glob("resume/*.json")).read_text())["run_id"]
    assert read_run_state(open_store(f"file://{store}"), interrupted)["status"] == "running"
    assert not (tmp_path / "summary.json").exists()

    pause.release()
    rerun = _mergeline(command, tmp_path, tmp_path / "rerun.log")
    rerun.wait(timeout=900)
    output = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, output[-3000:]
    assert f"resuming run {interrupted}" in output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run_id"] == interrupted
    cut = summary["tasks"][held["task"]]
    [done] = [task for name, task in summary["tasks"].items() if name != held["task"]]
    assert done["cache_hit"] is True and done["attempts"] == 0
    assert cut["cache_hit"] is False and (cut["resumed_from_step"], cut["attempts"]) == (CUT, 2)
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
    assert again["search"]["scores_computed"] == 0  # its own start's scores, stored pre-publish
    assert again["model"]["version"] == first["model"]["version"]
    assert set(again["model"]["aliases"]) >= set(first["model"]["aliases"])
    client = MlflowClient(tiny_spec["tracking"]["uri"])
    assert len(client.search_model_versions("name='tiny'")) == 1
    assert read_run_state(store, first["run_id"])["status"] == "succeeded"

"""Ctrl-C stops a run cleanly: exit 130, workers gone, nothing half-written visible, and the
same command then resumes and succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_SPEC

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _processes_of(ray_dir: Path) -> list[str]:
    """Processes of the Ray session the run started (its RAY_TMPDIR is unique to the test)."""
    result = subprocess.run(["pgrep", "-f", str(ray_dir)], capture_output=True, text=True)
    return result.stdout.split()


def _finetune_running(ray_dir: Path) -> bool:
    logs = list(ray_dir.glob("ray/session_*/logs/worker-*.err"))
    return any("run_finetune_job" in log.read_text(errors="replace") for log in logs)


def test_sigint_stops_cleanly_and_the_rerun_resumes(tmp_path: Path) -> None:
    spec = dict(TINY_SPEC) | {"finetune": {"steps": 40000, "batch_size": 32, "lr": 1e-3}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "pipelines.cli", "run", "spec.yaml", "--summary", "s.json"]
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    env = os.environ | {"COLUMNS": "120", "RAY_TMPDIR": str(ray_dir)}
    # Output goes to files: Ray's daemons inherit the driver's descriptors while they stop.
    # SIGINT gets its default handler, as in a terminal (a background parent may ignore it).
    err_path = tmp_path / "err.txt"
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=(tmp_path / "out.txt").open("w"),
        stderr=err_path.open("w"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    store = tmp_path / ".mergeline" / "store"
    deadline = time.monotonic() + 180
    while not list(store.glob("base-models/*/manifest.json")):
        assert process.poll() is None, err_path.read_text()
        assert time.monotonic() < deadline, "the base model never appeared"
        time.sleep(0.5)
    while not _finetune_running(ray_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    err = err_path.read_text()

    assert process.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not list(store.glob("task-vectors/*/manifest.json"))  # no fine-tune finished
    assert not (store / "models").exists()
    time.sleep(3)
    assert _processes_of(ray_dir) == []  # workers and Ray's daemons are gone

    spec["finetune"]["steps"] = 50  # the same pipeline, made quick for the rerun
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    rerun_out = tmp_path / "rerun.txt"
    with rerun_out.open("w") as handle:
        rerun = subprocess.run(
            command, cwd=tmp_path, env=env, stdout=handle, stderr=handle, timeout=300
        )
    assert rerun.returncode == 0, rerun_out.read_text()[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["status"] == "succeeded"
    assert "cache hit" in rerun_out.read_text()  # the pretrained base survived the interrupt

"""Ctrl-C stops a run cleanly: exit 130, workers gone, nothing half-written visible, and the
same command then resumes and succeeds. The interrupt lands while a fine-tune is held right
after its first checkpoint (:mod:`tests.faults`), never at a moment chosen by polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_SPEC
from tests.faults import Pause, wait_until_gone

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _processes_of(ray_dir: Path) -> list[str]:
    """Processes of the Ray session the run started (its RAY_TMPDIR is unique to the test)."""
    result = subprocess.run(["pgrep", "-f", str(ray_dir)], capture_output=True, text=True)
    return result.stdout.split()


def test_sigint_stops_cleanly_and_the_rerun_resumes(tmp_path: Path) -> None:
    spec = dict(TINY_SPEC) | {
        "finetune": {"steps": 300, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 100},
        "compute": {"num_cpus": 1},  # one fine-tune at a time: the held one blocks the other
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "pipelines.cli", "run", "spec.yaml", "--summary", "s.json"]
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    pause = Pause(tmp_path / "pause")
    pause.arm(100)  # the first fine-tune to store its checkpoint of step 100 is held there
    env = os.environ | {"COLUMNS": "120", "RAY_TMPDIR": str(ray_dir)} | pause.environment
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
    held = pause.wait_until_reached(alive=lambda: process.poll() is None)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    err = err_path.read_text()

    assert process.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not list(store.glob("task-vectors/*/manifest.json"))  # no fine-tune finished
    assert not (store / "models").exists()
    wait_until_gone(int(pid) for pid in _processes_of(ray_dir))
    assert _processes_of(ray_dir) == []  # workers and Ray's daemons are gone

    pause.release()
    rerun_out = tmp_path / "rerun.txt"
    with rerun_out.open("w") as handle:
        rerun = subprocess.run(
            command, cwd=tmp_path, env=env, stdout=handle, stderr=handle, timeout=300
        )
    assert rerun.returncode == 0, rerun_out.read_text()[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["status"] == "succeeded"
    assert "cache hit" in rerun_out.read_text()  # the pretrained base survived the interrupt
    assert summary["tasks"][held["task"]]["resumed_from_step"] == 100

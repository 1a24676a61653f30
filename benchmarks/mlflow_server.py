"""CPU cost of an ``mlflow server`` with and without MLflow's job runner, for the README.

With a SQL backend store, ``mlflow server`` also starts a job runner by default (GenAI jobs,
which mergeline never submits): a Huey consumer process per job queue, each importing mlflow
and polling the database. ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` leaves it out; the
tests' server (``tests/conftest_mlflow.py``) runs that way.

For each setting, ``ROUNDS`` times: start the server as the tests do (SQLite, proxied
artifacts, one worker), wait until ``/health`` answers, then until the server and every process
under it use less than ``SETTLED_CPU_S`` in ``SETTLE_S`` (its helpers have finished
importing): their CPU time so far is ``start_cpu_s``. Wait ``IDLE_S`` and sum again
(``idle_cpu_s_per_min``). Medians are reported. Writes
``benchmarks/results/mlflow_server.json``.

    python benchmarks/mlflow_server.py
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "mlflow_server.json"
ROUNDS = 3
SETTLE_S = 5.0  # the server counts as started once it uses less than SETTLED_CPU_S in this
SETTLED_CPU_S = 0.25
SETTLE_MAX_S = 180.0
IDLE_S = 60.0


def _cpu(root: psutil.Process) -> tuple[float, int]:
    """User + system CPU seconds of ``root`` and its live descendants, and how many there are."""
    processes = [root, *root.children(recursive=True)]
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total, len(processes)


def measure(job_execution: bool) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = str(job_execution).lower()
    with tempfile.TemporaryDirectory(prefix="mergeline-mlflow-bench-") as root:
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--serve-artifacts", "--artifacts-destination", f"{root}/artifacts",
        ]  # fmt: skip
        server = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            started = time.monotonic()
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"mlflow server exited early (code {server.returncode})")
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            healthy_s = time.monotonic() - started
            root_process = psutil.Process(server.pid)
            start_cpu, processes = _cpu(root_process)
            deadline = time.monotonic() + SETTLE_MAX_S
            while time.monotonic() < deadline:  # until its helpers have finished starting
                time.sleep(SETTLE_S)
                settled, processes = _cpu(root_process)
                settled, start_cpu = settled - start_cpu, settled
                if settled < SETTLED_CPU_S:
                    break
            time.sleep(IDLE_S)
            end_cpu, _ = _cpu(root_process)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return {
        "healthy_s": round(healthy_s, 2),
        "processes": processes,
        "start_cpu_s": round(start_cpu, 2),
        "idle_cpu_s_per_min": round((end_cpu - start_cpu) * 60 / IDLE_S, 3),
    }


def main() -> None:
    rounds: dict[str, list[dict]] = {"job_runner_on": [], "job_runner_off": []}
    for _ in range(ROUNDS):  # alternate: a shared machine's load falls on both alike
        for name, enabled in (("job_runner_on", True), ("job_runner_off", False)):
            rounds[name].append(measure(enabled))
            print(name, rounds[name][-1], flush=True)
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in rounds.items()
    }
    import mlflow

    result = {
        "command": "python benchmarks/mlflow_server.py",
        "mlflow": mlflow.__version__,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rounds": rounds,
        "median": medians,
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()

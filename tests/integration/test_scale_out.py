"""Scale-out: two Ray nodes on this machine, and joining a cluster started with ``ray start``.

Both run the pipeline with the CLI, as a user does, against the cluster's address; the nodes
are told apart by custom resources (``node_a``, ``node_b``).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _mergeline_run(spec: dict, cwd: Path, env: dict[str, str], *overrides: str) -> dict:
    (cwd / "spec.yaml").write_text(yaml.safe_dump(spec))
    sets = [item for override in overrides for item in ("--set", override)]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "spec.yaml", "--summary", "s.json", *sets],
        cwd=cwd,
        env=env | {"COLUMNS": "120", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads((cwd / "s.json").read_text())


def test_finetunes_and_search_actors_spread_over_two_nodes(tiny_spec: dict, tmp_path: Path):
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_nodes, list_tasks

    dashboard = _free_port()
    # Cluster records its address as this machine's current Ray (for `address="auto"`): put
    # back whatever was recorded before, so that other Ray users here are not redirected.
    current = Path(get_ray_address_file(None))
    previous = current.read_text() if current.is_file() else None
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"node_a": 1},
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard,
        },
    )
    try:
        cluster.add_node(num_cpus=2, resources={"node_b": 1})
        cluster.wait_for_nodes()
        spec = copy.deepcopy(tiny_spec)
        spec["finetune"]["steps"] = 400  # both fine-tunes need a worker at the same time
        spec["merge"]["num_actors"] = 2
        spec["compute"] = {"ray_address": cluster.address, "scheduling": "spread"}
        summary = _mergeline_run(spec, tmp_path, dict(os.environ))
        assert summary["status"] == "succeeded"

        api = f"http://127.0.0.1:{dashboard}"
        names = {
            node.node_id: next(r for r in ("node_a", "node_b") if r in node.resources_total)
            for node in list_nodes(address=api, detail=True)
        }
        finetunes = list_tasks(
            address=api, filters=[("func_or_class_name", "=", "run_finetune_job")], detail=True
        )
        scorers = list_actors(address=api, filters=[("class_name", "=", "CandidateScorer")])
        placed = {
            "fine-tunes": sorted(names[task.node_id] for task in finetunes),
            "search actors": sorted(names[actor.node_id] for actor in scorers),
        }
        assert placed == {k: ["node_a", "node_b"] for k in placed}
    finally:
        cluster.shutdown()
        if previous is not None:
            current.write_text(previous)


def test_the_pipeline_joins_a_cluster_started_with_ray_start(tiny_spec: dict, tmp_path: Path):
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="mlr-", dir="/tmp")  # short: Ray's socket paths
    # Ray's token authentication, as an operator sets it for the cluster and its clients.
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray = Path(sys.executable).with_name("ray")
    with (tmp_path / "head.log").open("w") as log:
        head = subprocess.Popen(
            [
                str(ray),
                "start",
                "--head",
                "--port",
                str(port),
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "2",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
                "--temp-dir",
                temp_dir,
                "--block",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "ray start did not come up"
                time.sleep(0.5)
        address = f"compute.ray_address=127.0.0.1:{port}"
        summary = _mergeline_run(tiny_spec, tmp_path, env, address)
        assert summary["status"] == "succeeded"
        assert all(task["cache_hit"] is False for task in summary["tasks"].values())
    finally:  # stop this cluster only: its own processes, by id (never `ray stop`)
        started = psutil.Process(head.pid).children(recursive=True)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        _, alive = psutil.wait_procs(started, timeout=30)
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)

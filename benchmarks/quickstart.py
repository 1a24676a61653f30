"""Quickstart wall time (cold and cached) and its accuracies, recorded for the README.

Runs ``mergeline run examples/quickstart.yaml`` twice in a fresh directory (cold: nothing in
the store, Ray started by the command; cached: every task vector a cache hit) and writes
``benchmarks/results/quickstart.json``.

    python benchmarks/quickstart.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "examples" / "quickstart.yaml"
RESULT = REPO / "benchmarks" / "results" / "quickstart.json"


def run_once(workdir: Path, label: str) -> tuple[float, dict]:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(SPEC), "--summary", f"{label}.json"],
        cwd=workdir,
        check=True,
        env=os.environ | {"COLUMNS": "120"},
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started, json.loads((workdir / f"{label}.json").read_text())


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mergeline-bench-") as directory:
        workdir = Path(directory)
        cold_s, cold = run_once(workdir, "cold")
        cached_s, cached = run_once(workdir, "cached")
    tasks = {}
    for name, task in cold["tasks"].items():
        merged = cold["best"]["test"]["per_task"][name]
        tasks[name] = {
            "zero_shot": task["zero_shot"]["test"],
            "finetuned": task["finetuned"]["test"],
            "merged": merged,
            "merged_normalized": merged / task["finetuned"]["test"],
            "zero_shot_normalized": task["zero_shot"]["test"] / task["finetuned"]["test"],
        }
    zero_norm = sum(t["zero_shot_normalized"] for t in tasks.values()) / len(tasks)
    result = {
        "command": "python benchmarks/quickstart.py",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "cold_wall_s": round(cold_s, 1),
        "cached_wall_s": round(cached_s, 1),
        "cached_all_hits": all(t["cache_hit"] for t in cached["tasks"].values()),
        "same_choice": cached["best"]["coefficients"] == cold["best"]["coefficients"],
        "timings_cold": cold["timings"],
        "best": {"method": cold["best"]["method"], "coefficients": cold["best"]["coefficients"]},
        "tasks": tasks,
        "test": {
            "zero_shot_mean_normalized": zero_norm,
            "merged_mean_normalized": cold["best"]["test"]["mean_normalized_accuracy"],
            "merged_mean_accuracy": cold["best"]["test"]["mean_accuracy"],
            "gain_points": 100 * (cold["best"]["test"]["mean_normalized_accuracy"] - zero_norm),
        },
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

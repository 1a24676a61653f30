"""Nightly incremental rerun versus full runs, recorded for the README.

Runs ``mergeline run examples/nightly-files.yaml`` in a fresh directory, on files written by
``examples/make_nightly_data.py``:

* ``cold``: an empty store (pretrains the base, fine-tunes all three tasks);
* ``full``: every task's data refreshed, so all three are fine-tuned again (base cached):
  what a pipeline without per-task caching does every night;
* ``incremental``: one task's data refreshed: only that task is fine-tuned;
* ``unchanged``: nothing changed since the run before: no fine-tuning, no candidate scored
  (the stored scores are reused), the previous run's model and registry version stand, and
  Ray is not started. Target: ≤ 0.3× the wall time of ``full``.

``full``, ``incremental`` and ``unchanged`` alternate ``PAIRS`` times (the machine may be
shared: the alternation spreads its load over all three) and are compared by their medians.
Writes ``benchmarks/results/nightly.json``.

    python benchmarks/nightly.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "examples" / "nightly-files.yaml"
MAKE_DATA = REPO / "examples" / "make_nightly_data.py"
RESULT = REPO / "benchmarks" / "results" / "nightly.json"
TASKS = ["digits-perm1", "digits-perm2", "digits-perm3"]
PAIRS = 3


def make_data(data: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, str(MAKE_DATA), str(data), *args], check=True, stdout=subprocess.DEVNULL
    )


def run_once(workdir: Path, spec: Path, label: str) -> dict:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(spec), "--summary", f"{label}.json"],
        cwd=workdir,
        check=True,
        env=os.environ | {"COLUMNS": "120"},
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    summary = json.loads((workdir / f"{label}.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "timings": summary["timings"],
        "rebuilt": {
            task: entry["rebuilt_reason"]
            for task, entry in summary["tasks"].items()
            if not entry["cache_hit"]
        },
        "test_mean_normalized_accuracy": summary["best"]["test"]["mean_normalized_accuracy"],
        "scores_computed": summary["search"].get("scores_computed"),
        "scores_reused": summary["search"].get("scores_reused"),
        "model_reused_from": summary["model"].get("reused_from"),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    runs: dict[str, list[dict]] = {"cold": [], "full": [], "incremental": [], "unchanged": []}
    with tempfile.TemporaryDirectory(prefix="mergeline-nightly-") as directory:
        workdir = Path(directory)
        data = workdir / "data"
        make_data(data)
        spec = workdir / "nightly-files.yaml"
        spec.write_text(SPEC.read_text().replace("examples/nightly-data/", f"{data}/"))
        runs["cold"].append(run_once(workdir, spec, "cold"))
        version = 1
        for pair in range(PAIRS):
            version += 1
            make_data(data, *[f"--refresh={task}" for task in TASKS], f"--version={version}")
            runs["full"].append(run_once(workdir, spec, f"full-{pair}"))
            version += 1
            make_data(data, "--refresh=digits-perm2", f"--version={version}")
            runs["incremental"].append(run_once(workdir, spec, f"incremental-{pair}"))
            runs["unchanged"].append(run_once(workdir, spec, f"unchanged-{pair}"))

    def median(kind: str, *path: str) -> float:
        values = []
        for run in runs[kind]:
            value = run
            for key in path:
                value = value[key]
            values.append(value)
        return round(statistics.median(values), 2)

    comparison = {
        kind: {
            "wall_s": median(kind, "wall_s"),
            "total_s": median(kind, "timings", "total_s"),
            "finetune_s": median(kind, "timings", "finetune_s"),
            "search_s": median(kind, "timings", "search_s"),
        }
        for kind in runs
    }
    result = {
        "command": "python benchmarks/nightly.py",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "medians": comparison,
        "incremental_vs_full": {
            "wall_ratio": round(
                comparison["incremental"]["wall_s"] / comparison["full"]["wall_s"], 3
            ),
            "finetune_ratio": round(
                comparison["incremental"]["finetune_s"] / comparison["full"]["finetune_s"], 3
            ),
        },
        "unchanged_vs_full": {
            "wall_ratio": round(
                comparison["unchanged"]["wall_s"] / comparison["full"]["wall_s"], 3
            ),
            "target": 0.3,
        },
        "runs": runs,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    ratios = {k: result[f"{k}_vs_full"] for k in ("incremental", "unchanged")}
    print(json.dumps(result["medians"] | {"ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()

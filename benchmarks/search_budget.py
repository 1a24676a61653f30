"""Search under an evaluation budget: successive halving against the full grid, and bayesian
against coordinate ascent for per-task coefficients, over 5 split seeds.

    python benchmarks/search_budget.py --only quickstart     # about 10 minutes on 2 CPU cores
    python benchmarks/search_budget.py --only causal_lm      # SmolLM2: about 75 min per seed
    python benchmarks/search_budget.py --only causal_lm --seeds 1   # split seed 0 only
    python benchmarks/search_budget.py                       # both

For each example (the quickstart, or the causal-LM example in standard mode) and each split
seed (``evaluation.split_seed`` and ``merge.search.seed``), it runs ``mergeline run`` in a
fresh directory (subprocesses, the README's command) with:

1. a grid of 3 methods × their params × 11 coefficients (task_arithmetic; ties with three
   densities; tsv), once with ``strategy: grid`` and once with ``successive_halving`` (eta 3):
   validation rows scored by halving ÷ by the grid, whether both chose the same candidate, and
   the gap between their choices' validation objectives (target: the same candidate or within
   0.5 points, 0.005);
2. per-task task-arithmetic coefficients in standard mode, ``coordinate_ascent`` against
   ``bayesian`` at the same candidate budget: the best validation objective of each;

and the search stage's wall time of every run (``summary.search.seconds``). Fine-tuning is
shared by the runs of one seed (one store per seed: the later runs are cache hits). Results:
``benchmarks/results/search_budget.json`` (an existing file keeps the other example's part).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "search_budget.json"
EXAMPLES = {
    "quickstart": REPO / "examples" / "quickstart.yaml",
    "causal_lm": REPO / "examples" / "causal-lm.yaml",
}
GRIDS = {  # 3 methods × their params × 11 coefficients
    "quickstart": [
        {"method": "task_arithmetic", "coefficient": {"start": 0.0, "stop": 1.0, "num": 11}},
        {
            "method": "ties",
            "params": {"density": [0.1, 0.2, 0.4]},
            "coefficient": {"start": 0.4, "stop": 2.0, "num": 11},
        },
        {"method": "tsv", "coefficient": {"start": 0.4, "stop": 2.0, "num": 11}},
    ],
}
GRIDS["causal_lm"] = GRIDS["quickstart"]
PER_TASK_BUDGET = 40
SEEDS = range(5)
WITHIN = 0.005  # half a point of the validation objective


def run(spec: dict[str, Any], workdir: Path, label: str) -> dict[str, Any]:
    """``mergeline run`` of ``spec`` in ``workdir``; returns its summary."""
    spec = spec | {
        "storage": {"uri": f"file://{workdir}/store"},
        "tracking": spec["tracking"] | {"uri": f"sqlite:///{workdir}/mlflow.db"},
    }
    path = workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    summary = workdir / f"{label}.json"
    subprocess.run(  # from the repository: the examples' relative data and model paths
        [sys.executable, "-m", "pipelines.cli", "run", str(path), "--summary", str(summary)],
        cwd=REPO,
        check=True,
        env=os.environ | {"COLUMNS": "120", "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
    )
    return json.loads(summary.read_text())


def variant(base: dict[str, Any], seed: int, name: str, **search: Any) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    spec["name"] = f"{base['name']}-{name}"
    spec["evaluation"]["split_seed"] = seed
    spec["merge"]["search"] = {"seed": seed, **search}
    return spec


def chosen(summary: dict[str, Any]) -> dict[str, Any]:
    best = summary["best"]
    return {
        "method": best["method"],
        "params": best["params"],
        "coefficients": best["coefficients"],
        "val": best["val"]["mean_normalized_accuracy"],
    }


def one_seed(example: str, seed: int, workdir: Path) -> dict[str, Any]:
    base = yaml.safe_load(EXAMPLES[example].read_text())
    base["finetune"]["mode"] = "standard"
    grid_spec = copy.deepcopy(base)
    grid_spec["merge"]["candidates"] = GRIDS[example]
    grid = run(variant(grid_spec, seed, "grid", strategy="grid"), workdir, "grid")
    halving = run(
        variant(grid_spec, seed, "halving", strategy="successive_halving", eta=3),
        workdir,
        "halving",
    )
    per_task_spec = copy.deepcopy(base)
    per_task_spec["merge"]["candidates"] = [GRIDS[example][0]]
    per_task = {
        strategy: run(
            variant(
                per_task_spec,
                seed,
                strategy.replace("_", "-"),
                per_task=True,
                strategy=strategy,
                budget=PER_TASK_BUDGET,
            ),
            workdir,
            strategy,
        )
        for strategy in ("coordinate_ascent", "bayesian")
    }
    a, b = chosen(grid), chosen(halving)
    return {
        "seed": seed,
        "grid": a
        | {
            "search_s": grid["search"]["seconds"],
            "candidates": grid["search"]["candidates_evaluated"],
        },
        "halving": b
        | {
            "search_s": halving["search"]["seconds"],
            "rows_scored": halving["search"]["rows_scored"],
            "rows_full_grid": halving["search"]["rows_full_grid"],
            "rows_ratio": halving["search"]["rows_scored"] / halving["search"]["rows_full_grid"],
        },
        "same_candidate": {k: a[k] for k in ("method", "params", "coefficients")}
        == {k: b[k] for k in ("method", "params", "coefficients")},
        "val_gap": a["val"] - b["val"],
        "per_task": {
            strategy: chosen(summary)
            | {
                "search_s": summary["search"]["seconds"],
                "candidates": summary["search"]["candidates_evaluated"],
            }
            for strategy, summary in per_task.items()
        },
    }


def measure(example: str, seeds_wanted: range, save: Any) -> dict[str, Any]:
    """Every seed of ``example``; ``save`` gets the summary so far after each seed (a run of
    hours keeps what it finished)."""
    seeds: list[dict[str, Any]] = []
    for seed in seeds_wanted:
        with tempfile.TemporaryDirectory(prefix="mergeline-budget-") as directory:
            seeds.append(one_seed(example, seed, Path(directory)))
            print(json.dumps(seeds[-1]), flush=True)
        save(summarise(example, seeds))
    return summarise(example, seeds)


def summarise(example: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [s["halving"]["rows_ratio"] for s in seeds]
    return {
        "seeds_run": len(seeds),
        "grid": GRIDS[example],
        "per_task_budget": PER_TASK_BUDGET,
        "seeds": seeds,
        "rows_ratio_max": max(ratios),
        "rows_ratio_target": 0.3,
        "halving_agrees": sum(s["same_candidate"] or s["val_gap"] <= WITHIN for s in seeds),
        "halving_same_candidate": sum(s["same_candidate"] for s in seeds),
        "val_gap_max": max(s["val_gap"] for s in seeds),
        "per_task_mean_val": {
            strategy: statistics.mean(s["per_task"][strategy]["val"] for s in seeds)
            for strategy in ("coordinate_ascent", "bayesian")
        },
        "search_s_mean": {
            "grid": statistics.mean(s["grid"]["search_s"] for s in seeds),
            "successive_halving": statistics.mean(s["halving"]["search_s"] for s in seeds),
            "coordinate_ascent": statistics.mean(
                s["per_task"]["coordinate_ascent"]["search_s"] for s in seeds
            ),
            "bayesian": statistics.mean(s["per_task"]["bayesian"]["search_s"] for s in seeds),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(EXAMPLES), default=None)
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="split seeds 0..N-1")
    args = parser.parse_args()
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    result |= {
        "command": "python benchmarks/search_budget.py",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    for example in [args.only] if args.only else sorted(EXAMPLES):

        def save(part: dict[str, Any], example: str = example) -> None:
            result[example] = part
            RESULT.write_text(json.dumps(result, indent=1) + "\n")

        save(measure(example, range(args.seeds), save))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:4000])


if __name__ == "__main__":
    main()

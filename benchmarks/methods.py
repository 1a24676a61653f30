"""Every merge method on the examples: the best candidate of each method, for the README tables.

    python benchmarks/methods.py --only quickstart-methods    # ~30 s
    python benchmarks/methods.py --only quickstart-slerp      # ~15 s
    python benchmarks/methods.py --only causal-lm-methods     # ~30 min (SmolLM2, 2 CPU cores)
    python benchmarks/methods.py --only causal-lm-methods --run .mergeline/store/runs/<run-id> \
        --label <name>                                        # a finished run, under <name>

Runs ``mergeline run examples/<name>.yaml`` cold from the repository (its store in a temporary
directory), or reads a finished run's ``runs/<run-id>/`` with ``--run``, and records per method
the best candidate's validation objective (and params, coefficient), the chosen candidate's
test scores and the stage timings in ``benchmarks/results/methods.json`` (other examples'
entries are kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "methods.json"
EXAMPLES = ("quickstart-methods", "quickstart-slerp", "causal-lm-methods")


def best_by_method(run: Path) -> dict[str, Any]:
    """The finished run's best candidate per method, its choice, test scores and timings."""
    candidates = json.loads((run / "candidates.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    objective = candidates["objective"]
    best: dict[str, dict[str, Any]] = {}
    for row in candidates["rows"]:
        value = row["objective"][objective]
        if row["method"] not in best or value > best[row["method"]]["val"]:
            coefficient = row.get("coefficients") or row.get("coefficient")
            best[row["method"]] = {
                "val": value,
                "params": row.get("params"),
                "coefficient": coefficient,
            }
    ranked = dict(sorted(best.items(), key=lambda item: -item[1]["val"]))
    return {
        "run_id": summary["run_id"],
        "objective": objective,
        "candidates": summary["search"]["candidates_evaluated"],
        "best_by_method": ranked,
        "chosen": {"method": summary["best"]["method"], "test": summary["best"]["test"]},
        "timings": summary["timings"],
    }


def run_cold(example: str) -> dict[str, Any]:
    spec = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="mergeline-methods-") as directory:
        spec["storage"] = {"uri": f"file://{directory}/store"}
        spec["tracking"] = spec["tracking"] | {"uri": f"sqlite:///{directory}/mlflow.db"}
        path = Path(directory) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        subprocess.run(  # from the repository: the examples' relative data and model paths
            [sys.executable, "-m", "pipelines.cli", "run", str(path)],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        [run] = (Path(directory) / "store" / "runs").iterdir()
        return best_by_method(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=EXAMPLES, default=None)
    parser.add_argument("--run", type=Path, help="a finished run's folder to read instead")
    parser.add_argument("--label", help="the entry's name in the JSON (default: the example)")
    args = parser.parse_args()
    if args.run is not None and args.only is None:
        parser.error("--run needs --only: the example that run was")
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    result["command"] = "python benchmarks/methods.py"
    for example in [args.only] if args.only else EXAMPLES:
        entry = best_by_method(args.run) if args.run else run_cold(example)
        entry["source"] = f"--run {args.run}" if args.run else "cold run"
        result[args.label or example] = entry
        RESULT.write_text(json.dumps(result, indent=1) + "\n")
        print(example, json.dumps(entry["best_by_method"]))


if __name__ == "__main__":
    main()

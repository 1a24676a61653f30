"""Merge throughput and peak memory: mergeline's streaming engine against mergekit, same files.

    python benchmarks/merge_throughput.py    # writes benchmarks/results/merge_throughput.json

Builds, in a temporary directory deleted at the end, a Hugging Face Llama model of ~120M
float32 parameters (random init from a config) and 8 fine-tuned variants (base + small random
deltas), plus the same 8 task vectors in a mergeline store. Installs mergekit into its own
virtualenv (torch==2.13.0 first, from the local CPU wheel; reused on later runs). Then times,
each in its own subprocess under ``/usr/bin/time`` (wall time, peak RSS), alternating tools:

- ``mergeline merge`` (the CLI: manifest sha256 checks, base digest, streamed merge, shards),
- ``mergekit-yaml`` on the fine-tuned models,

for task_arithmetic and ties with per-tensor trimming (the semantics both share), plus
mergeline's global-scope ties and its task_arithmetic with ``--mmap`` (inputs memory-mapped
through safetensors.safe_open instead of read into reused buffers). Both tools run with the
same torch thread count (``--threads``, default 1: the 2-core machine is shared). Throughput
is GB of task-vector data read per second (8 × the model's bytes). The machine's memory
bandwidth (a large in-memory tensor copy) is the ceiling. Each tool reads its inputs once
before each run, so both start from the page cache. The reported figures are the fastest of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "merge_throughput.json"
DEFAULT_VENV = Path.home() / ".cache" / "mergeline" / "mergekit-venv"
LAMBDA = 0.3
DENSITY = 0.2


def memory_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a large in-memory tensor copy (bytes copied per second, best of ``repeats``)."""
    source = torch.ones(int(gigabytes * 1e9 / 4))
    target = torch.zeros_like(source)  # touched: page faults are not part of the copy
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return source.numel() * 4 / best / 1e9


def ensure_mergekit(venv: Path) -> str:
    """A virtualenv with torch==2.13.0 installed first, then mergekit; returns its version."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit"], check=True)
    code = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"
    versions = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    mergekit_version, torch_version = versions.stdout.split()
    if not torch_version.startswith("2.13.0"):
        raise SystemExit(f"mergekit's venv has torch {torch_version}, expected 2.13.0")
    return mergekit_version


def build_models(root: Path, tasks: int, layers: int) -> dict:
    """Base + fine-tuned variants (HF dirs) and the task vectors in a store; returns paths."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from storage.artifacts import write_artifact
    from storage.digest import digest_state
    from storage.objectstore import open_store
    from storage.tensors import tensors_to_bytes

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    del model
    digest = digest_state(base)
    store = open_store(f"file://{root / 'store'}")
    uris, finetuned = [], []
    for index in range(tasks):
        generator = torch.Generator().manual_seed(1000 + index)
        variant = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        directory = root / f"finetuned-{index}"
        directory.mkdir()
        save_file(variant, directory / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(base_dir / "config.json", directory / "config.json")
        delta = {k: variant[k] - base[k] for k in base}
        del variant
        files = {
            "delta.safetensors": tensors_to_bytes(delta),
            "head.safetensors": tensors_to_bytes({}),
        }
        meta = {"kind": "task_vector", "task": f"task{index}", "base_digest": digest}
        uris.append(write_artifact(store, f"task-vectors/bench{index}", files, meta).uri)
        finetuned.append(directory)
        del delta, files
    parameters = sum(v.numel() for v in base.values())
    return {"base": base_dir, "store": store.uri, "uris": uris, "finetuned": finetuned,
            "parameters": parameters, "model_bytes": parameters * 4}  # fmt: skip


def mergekit_config(models: dict, method: str, path: Path) -> Path:
    weight = LAMBDA if method == "task_arithmetic" else 1.0
    parameters = {"weight": weight} | ({"density": DENSITY} if method == "ties" else {})
    config = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(d), "parameters": parameters} for d in models["finetuned"]],
        "parameters": {"normalize": method == "ties", "lambda": 1.0},
        "dtype": "float32",
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def warm(models: dict, finetuned: bool) -> None:
    """Read a tool's input files once so each run starts from the page cache, not the disk."""
    paths = [models["base"] / "model.safetensors"]
    if finetuned:
        paths += [d / "model.safetensors" for d in models["finetuned"]]
    else:
        paths += [Path(uri.removeprefix("file://")) / "delta.safetensors" for uri in models["uris"]]
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(64 * 1024 * 1024):
                pass


def timed(command: list[str], root: Path) -> dict:
    """Wall seconds and peak RSS (MB) of ``command`` in its own process, via /usr/bin/time."""
    report = root / "time.txt"
    full = ["/usr/bin/time", "-f", "%e %M", "-o", str(report), *command]
    done = subprocess.run(full, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    seconds, kilobytes = report.read_text().split()[-2:]
    return {"seconds": float(seconds), "peak_rss_mb": int(kilobytes) / 1024}


def commands(models: dict, root: Path, venv: Path, out: Path, threads: int) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "pipelines.cli", "merge", "--base", str(models["base"])]
    cli += [arg for uri in models["uris"] for arg in ("--task", uri)]
    cli += ["--store", models["store"], "--threads", str(threads), "--out"]
    mergekit = [str(venv / "bin" / "mergekit-yaml")]
    flags = ["--no-cuda", "--lazy-unpickle", "--quiet", "--no-write-model-card", "-j", str(threads)]
    return {
        "mergeline/task_arithmetic": [*cli, str(out), "--coefficient", str(LAMBDA)],
        "mergekit/task_arithmetic": [
            *mergekit, str(mergekit_config(models, "task_arithmetic", root / "ta.yml")),
            str(out), *flags,
        ],
        "mergeline/ties": [
            *cli, str(out), "--method", "ties", "--param", f"density={DENSITY}",
            "--param", "scope=per_tensor", "--coefficient", "1.0",
        ],
        "mergekit/ties": [
            *mergekit, str(mergekit_config(models, "ties", root / "ties.yml")), str(out), *flags,
        ],
        "mergeline/ties_global": [
            *cli, str(out), "--method", "ties", "--param", f"density={DENSITY}",
            "--param", "scope=global", "--coefficient", "1.0",
        ],
        "mergeline/task_arithmetic_mmap": [
            *cli, str(out), "--coefficient", str(LAMBDA), "--mmap",
        ],
    }  # fmt: skip


def compare(first: Path, second: Path) -> dict:
    """Max |difference| and allclose over every tensor of two merged model directories."""
    from storage.shards import SafetensorsReader

    worst, close, differing, total = 0.0, True, 0, 0
    with SafetensorsReader(first) as a, SafetensorsReader(second) as b:
        for name in a.names():
            x, y = a.read(name), b.read(name)
            worst = max(worst, float((x - y).abs().max()))
            close = close and torch.allclose(x, y, rtol=1e-5, atol=1e-6)
            differing += int((x != y).sum())
            total += x.numel()
    return {"allclose": close, "max_abs_diff": worst, "fraction_differing": differing / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both tools")
    parser.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    bandwidth = memory_bandwidth()
    mergekit_version = ensure_mergekit(args.mergekit_venv)
    root = Path(tempfile.mkdtemp(prefix="mergeline-bench-", dir=args.workdir))
    try:
        models = build_models(root, args.tasks, args.layers)
        read_gb = args.tasks * models["model_bytes"] / 1e9
        runs: dict[str, list[dict]] = {}
        keep = {
            f"{tool}/{method}": root / f"{tool}-{method}"
            for tool in ("mergeline", "mergekit")
            for method in ("task_arithmetic", "ties")
        }
        for repeat in range(args.repeats):
            runnable = commands(models, root, args.mergekit_venv, root / "out", args.threads)
            for name, command in runnable.items():
                shutil.rmtree(root / "out", ignore_errors=True)
                warm(models, name.startswith("mergekit"))
                run = timed(command, root)
                run["gb_per_s"] = read_gb / run["seconds"]
                runs.setdefault(name, []).append(run)
                print(f"[{repeat}] {name}: {run}", flush=True)
                if repeat == 0 and name in keep:
                    os.replace(root / "out", keep[name])
        best = {name: min(found, key=lambda r: r["seconds"]) for name, found in runs.items()}
        vs = {}
        for method in ("task_arithmetic", "ties"):
            ours, theirs = best[f"mergeline/{method}"], best[f"mergekit/{method}"]
            vs[method] = {
                "throughput_ratio": round(ours["gb_per_s"] / theirs["gb_per_s"], 3),
                "peak_rss_ratio": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
                "mergeline": ours,
                "mergekit": theirs,
                "outputs": compare(keep[f"mergeline/{method}"], keep[f"mergekit/{method}"]),
            }
        result = {
            "vs_mergekit": vs,
            "mergeline_ties_global": best["mergeline/ties_global"],
            "mergeline_task_arithmetic_mmap": best["mergeline/task_arithmetic_mmap"],
            "memory_bandwidth_gb_per_s": round(bandwidth, 2),
            "model": {
                "architecture": "LlamaForCausalLM",
                "parameters": models["parameters"],
                "bytes": models["model_bytes"],
                "tasks": args.tasks,
                "task_vector_gb_read": round(read_gb, 3),
            },
            "settings": {
                "lambda": LAMBDA,
                "density": DENSITY,
                "repeats": args.repeats,
                "torch_threads": args.threads,
                "reported": "fastest run of each; peak RSS of that run",
            },
            "runs": runs,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "mergekit": mergekit_version,
            },
            "command": "python benchmarks/merge_throughput.py",
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: result[k] for k in ("memory_bandwidth_gb_per_s", "model")}, indent=1))
        for method, row in vs.items():
            print(method, {k: row[k] for k in ("throughput_ratio", "peak_rss_ratio", "outputs")})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

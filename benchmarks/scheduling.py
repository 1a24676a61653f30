"""Scheduling overhead, CPU scaling and training-engine throughput, recorded for the README.

Three measurements, written to ``benchmarks/results/scheduling.json``:

1. **Scheduler overhead per fine-tune task**: 64 fine-tune tasks (``run_finetune_job``, the
   pipeline's own Ray task) of a tiny model, one step each, on a local Ray with 2 CPUs.
   Overhead per task = (CPUs x wall time - the summed time inside the tasks) / 64: the
   CPU-seconds each task costs beyond its own work (scheduling, argument transfer, results),
   once the workers are warm (one task per worker runs before the clock starts).
2. **CPU scaling**: two equal fine-tune tasks on a local Ray with 1 CPU, then with 2 CPUs;
   the wall-time ratio (2.0 is perfect).
3. **Training throughput** (samples/s) of the fine-tune loop through mergeline's engines
   (plain torch, DeepSpeed ZeRO 0 and 2 on one process) against a bare PyTorch loop, on the
   same model, data and batch, measured alternately, one thread each: the quickstart's MLP
   (0.3 M parameters, about 3 ms a step, where fixed per-step costs show) and a wide one
   (4.3 M parameters).

    python benchmarks/scheduling.py            # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "scheduling.json"
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
import torch  # noqa: E402

from pipelines.run.fingerprint import fingerprint_datasets, fingerprint_pretrain  # noqa: E402
from pipelines.spec.load import validate_document  # noqa: E402
from pipelines.spec.plan import make_plan, task_vector_key  # noqa: E402
from pipelines.spec.refs import DatasetRef  # noqa: E402
from pipelines.stages.base import pretrain_base_job  # noqa: E402
from pipelines.stages.finetune import run_finetune_job  # noqa: E402
from pipelines.stages.jobs import FinetuneJob, PretrainJob  # noqa: E402
from storage.objectstore import open_store  # noqa: E402
from workers.data import load_dataset  # noqa: E402
from workers.finetune import TrainConfig  # noqa: E402
from workers.finetune.engine import Classifier, TorchEngine  # noqa: E402
from workers.finetune.loop import fit  # noqa: E402
from workers.models import build_backbone, fit_linear_probe  # noqa: E402
from workers.search.evaluate import features_at  # noqa: E402

DIGITS = {"source": "sklearn", "name": "digits", "pool": "tasks"}
SPEC: dict[str, Any] = {
    "name": "bench",
    "base_model": {"source": "builtin", "name": "mlp", "hidden": [32], "features": 8},
    "tasks": [
        {"name": "digits", "dataset": DIGITS | {"transform": {"kind": "permute", "seed": 1}}}
    ],
    "finetune": {"steps": 1, "batch_size": 32, "lr": 1e-3},
}


def timed_finetune(*args: Any) -> float:
    """The pipeline's fine-tune task, timed from inside its worker."""
    started = time.perf_counter()
    run_finetune_job(*args)
    return time.perf_counter() - started


class Bench:
    """A store with the base model in it, and the arguments of one task's fine-tune."""

    def __init__(self, directory: Path, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.plan = make_plan(validate_document(spec))
        datasets = fingerprint_datasets(self.plan)
        self.base_key = fingerprint_pretrain(self.plan, datasets)
        self.store = open_store(f"file://{directory}/store")
        input_dim = next(iter(datasets.values())).input_dim
        job = PretrainJob(
            {"uri": self.store.uri}, self.base_key, self.plan.base_model, {}, input_dim
        )
        self.base, _ = pretrain_base_job(job)
        self.digest = datasets["digits"].digest()

    def args(self, seed: int) -> tuple[FinetuneJob]:
        finetune = copy.deepcopy(self.plan.finetune) | {"seed": seed}  # a distinct task vector
        task = self.plan.tasks[0]
        key = task_vector_key(self.base.digest, self.digest, finetune)
        dataset = DatasetRef(task.name, task.dataset, self.digest)
        return (
            FinetuneJob(
                {"uri": self.store.uri}, key, dataset, self.base, finetune, self.plan.evaluation
            ),
        )


def run_tasks(bench: Bench, seeds: range, cpus: int) -> tuple[float, list[float]]:
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False)
    try:
        job = ray.remote(timed_finetune).options(num_cpus=1)
        # Before the clock: the cluster is up and each worker has imported torch & co.
        ray.get([job.remote(*bench.args(seed)) for seed in range(-cpus, 0)])
        started = time.perf_counter()
        work = ray.get([job.remote(*bench.args(seed)) for seed in seeds])
        return time.perf_counter() - started, work
    finally:
        ray.shutdown()


def scheduler_overhead(directory: Path, tasks: int, cpus: int) -> dict[str, Any]:
    bench = Bench(directory / "overhead", SPEC)
    wall, work = run_tasks(bench, range(tasks), cpus)
    return {
        "tasks": tasks,
        "steps_per_task": 1,
        "ray_cpus": cpus,
        "wall_s": round(wall, 3),
        "work_s_total": round(sum(work), 3),
        "work_s_per_task_median": round(statistics.median(work), 4),
        "overhead_s_per_task": round((cpus * wall - sum(work)) / tasks, 4),
    }


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_without_ray(bench: Bench, seeds: range, processes: int) -> float:
    """The same tasks in plain worker processes: what this machine gives in parallel now."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes, initializer=_one_thread) as pool:
        warm = [bench.args(seed) for seed in range(-processes, 0)]  # as for Ray, see above
        list(pool.map(timed_finetune, *zip(*warm, strict=True)))
        started = time.perf_counter()
        list(pool.map(timed_finetune, *zip(*(bench.args(seed) for seed in seeds), strict=True)))
        return time.perf_counter() - started


def cpu_scaling(directory: Path, steps: int, rounds: int) -> dict[str, Any]:
    """Two equal fine-tunes on 1 vs 2 CPUs, in turn for ``rounds`` rounds; the same without
    Ray shows what the machine allows meanwhile (other load on a shared machine caps both)."""
    spec = copy.deepcopy(SPEC)
    spec["base_model"]["hidden"] = [256, 256]
    spec["finetune"] |= {"steps": steps, "batch_size": 128}
    walls: dict[str, list[float]] = {"ray_1": [], "ray_2": [], "plain_1": [], "plain_2": []}
    for index in range(rounds):
        for cpus in (1, 2):
            bench = Bench(directory / f"ray-{cpus}-{index}", spec)
            walls[f"ray_{cpus}"].append(run_tasks(bench, range(2), cpus)[0])
            bench = Bench(directory / f"plain-{cpus}-{index}", spec)
            walls[f"plain_{cpus}"].append(run_without_ray(bench, range(2), cpus))
    median = {name: statistics.median(values) for name, values in walls.items()}
    return {
        "tasks": 2,
        "steps_per_task": steps,
        "rounds": rounds,
        "wall_s_1_cpu": round(median["ray_1"], 3),
        "wall_s_2_cpus": round(median["ray_2"], 3),
        "ratio_1_over_2": round(median["ray_1"] / median["ray_2"], 3),
        "without_ray_ratio_1_over_2": round(median["plain_1"] / median["plain_2"], 3),
        "wall_s_all": {name: [round(v, 3) for v in values] for name, values in walls.items()},
    }


def bare_loop(model: torch.nn.Module, x, y, config: TrainConfig):
    """What a user would write by hand: the reference for the engines."""
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr)

    def run() -> None:
        generator = torch.Generator().manual_seed(config.seed)
        for _ in range(config.steps):
            batch = torch.randint(0, len(labels), (config.batch_size,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def throughput(hidden: list[int], steps: int, rounds: int) -> dict[str, Any]:
    """Samples/s of each variant's training loop (set-up excluded), variants in turn."""
    from workers.finetune.deepspeed_engine import DeepSpeedEngine

    torch.set_num_threads(1)
    data = load_dataset(DIGITS, {"val_fraction": 0.1, "val_max": 5000, "split_seed": 0}, "bench")
    config = {"source": "builtin", "name": "mlp", "hidden": hidden, "features": 8}
    backbone = build_backbone(config, data.input_dim)
    theta0 = {k: v.clone() for k, v in backbone.state_dict().items()}
    features = features_at(backbone, theta0, data.x_train).numpy()
    head = fit_linear_probe(features, data.y_train, data.num_classes)
    train = TrainConfig(steps=steps, batch_size=64, lr=3e-4)
    x, y = data.x_train, data.y_train

    def model() -> Classifier:
        fresh = build_backbone(config, data.input_dim)
        fresh.load_state_dict(theta0)
        return Classifier(fresh, head)

    def engine_loop(engine):
        return lambda: fit(engine, x, y, train, "bench")

    variants = {  # each builds its model and engine, then returns the loop to time
        "bare_pytorch": lambda: bare_loop(model(), x, y, train),
        "engine_torch": lambda: engine_loop(TorchEngine(model(), train)),
        "engine_deepspeed_zero0": lambda: engine_loop(DeepSpeedEngine(model(), train, 0)),
        "engine_deepspeed_zero2": lambda: engine_loop(DeepSpeedEngine(model(), train, 2)),
    }
    for build in variants.values():  # warm-up: imports, DeepSpeed's op load, allocator
        build()()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, build in variants.items():
            run = build()
            started = time.perf_counter()
            run()
            samples[name].append(steps * train.batch_size / (time.perf_counter() - started))
    bare = statistics.median(samples["bare_pytorch"])
    return {
        "model": config | {"parameters": sum(p.numel() for p in backbone.parameters())},
        "batch_size": train.batch_size,
        "steps_per_measurement": steps,
        "rounds": rounds,
        "threads": 1,
        "samples_per_s_median": {k: round(statistics.median(v), 1) for k, v in samples.items()},
        "relative_to_bare_median": {
            k: round(statistics.median(v) / bare, 3) for k, v in samples.items()
        },
        "samples_per_s_all": {k: [round(s, 1) for s in v] for k, v in samples.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--scaling-steps", type=int, default=1500)
    parser.add_argument("--throughput-steps", type=int, default=300)
    parser.add_argument("--wide-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mergeline-sched-") as directory:
        overhead = scheduler_overhead(Path(directory), args.tasks, cpus=2)
        scaling = cpu_scaling(Path(directory), args.scaling_steps, args.rounds)
    speed = {
        "quickstart_mlp": throughput([512, 512], args.throughput_steps, args.rounds),
        "wide_mlp": throughput([2048, 2048], args.wide_steps, args.rounds),
    }
    result = {
        "command": "python benchmarks/scheduling.py",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
        "scheduler_overhead": overhead,
        "cpu_scaling": scaling,
        "throughput": speed,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

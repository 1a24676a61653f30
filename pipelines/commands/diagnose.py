"""``mergeline diagnose``: diagnostics over a spec's task vectors.

``mergeline diagnose disentanglement SPEC --tasks A,B`` runs the spec's fine-tune stage (every
task vector already in the store is a cache hit), computes the weight disentanglement error
ξ(α1, α2) of the pair on a grid (the exact fast path for linear-mode task vectors, real forward
passes otherwise) and writes ``disentanglement-A-B.csv`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pipelines.report.consoles import output_console
from storage.errors import SpecError

diagnose_app = typer.Typer(no_args_is_help=True, help="Diagnostics over a spec's task vectors.")


@diagnose_app.command("disentanglement")
def disentanglement_command(
    spec: Annotated[Path, typer.Argument(help="The pipeline spec (YAML).", show_default=False)],
    tasks: Annotated[str, typer.Option("--tasks", help="Two task names: A,B.")],
    out: Annotated[Path, typer.Option(help="Directory for the CSV and PNG.")] = Path("."),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a spec field (repeatable).")
    ] = None,
    start: Annotated[float, typer.Option(help="Smallest α.")] = -2.0,
    stop: Annotated[float, typer.Option(help="Largest α.")] = 2.0,
    num: Annotated[int, typer.Option(help="Grid points per axis.", min=2)] = 21,
    split: Annotated[str, typer.Option(help="Split whose inputs are compared.")] = "val",
) -> None:
    """Weight disentanglement error heatmap (PNG) and CSV of two tasks over an (α1, α2) grid."""
    from pipelines.commands.outputs import check_output_directory
    from pipelines.spec.load import load_spec

    check_output_directory(out, "--out")
    loaded = load_spec(spec, set_ or [])
    pair = tuple(name.strip() for name in tasks.split(","))
    names = [task.name for task in loaded.tasks]
    if len(pair) != 2 or pair[0] == pair[1] or any(name not in names for name in pair):
        raise SpecError(f"--tasks {tasks!r}: name two different tasks of the spec, from {names}")
    if split not in ("val", "test"):
        raise SpecError(f"--split {split!r}: use val or test")
    kind = getattr(loaded.base_model, "kind", "classification")
    if kind != "classification":
        raise SpecError(
            f"diagnose disentanglement compares predicted labels: base_model.kind {kind!r} has "
            "none (it is defined for classification tasks)"
        )
    alphas = [round(start + i * (stop - start) / (num - 1), 10) for i in range(num)]
    console = output_console()
    errors = compute_disentanglement(loaded, pair, alphas, split, console)
    csv_path, png_path = write_disentanglement(errors, pair, alphas, loaded.finetune.mode, out)
    console.print(f"ξ min {min(map(min, errors)):.3f} max {max(map(max, errors)):.3f}")
    console.print(f"wrote {csv_path} and {png_path}")


def compute_disentanglement(
    spec: Any, pair: tuple[str, str], alphas: list[float], split: str, console: Console
) -> list[list[float]]:
    """The spec's fine-tune stage for the pair (cache hits when stored), then ξ on Ray."""
    from pipelines.run.context import RunContext
    from pipelines.run.dag import submit_disentanglement
    from pipelines.run.finetune import finetune_all, prepare_base
    from pipelines.run.fingerprint import fingerprint_datasets, fingerprint_pretrain
    from pipelines.run.raysession import get, ray_session
    from pipelines.run.resources import await_placement, refuse_impossible
    from pipelines.spec.plan import make_plan
    from storage.objectstore import open_store

    subset = spec.model_copy(update={"tasks": [t for t in spec.tasks if t.name in pair]})
    plan = make_plan(subset)
    compute = spec.compute
    requests = refuse_impossible(plan, compute.ray_address, compute.num_cpus)
    storage = spec.storage
    store = open_store(storage.uri, storage.endpoint_url, storage.retry_seconds)
    store_cfg = {
        "uri": store.uri,
        "endpoint_url": storage.endpoint_url,
        "retry_seconds": storage.retry_seconds,
    }
    datasets = fingerprint_datasets(plan)
    base_key = fingerprint_pretrain(plan, datasets)
    input_dim = next(iter(datasets.values())).input_dim
    with ray_session(compute.ray_address, compute.num_cpus):
        await_placement(requests, compute.ray_address, compute.placement_timeout_s)
        ctx = RunContext("diagnose", store, store_cfg, console)
        base = prepare_base(ctx, plan, base_key, input_dim)
        done = finetune_all(ctx, plan, base, datasets)
        specs = {
            name: {"key": done[name]["key"], "dataset": plan.task(name).dataset} for name in pair
        }
        mode = plan.spec.finetune.mode
        with console.status(f"disentanglement error over {len(alphas)}² points"):
            job = submit_disentanglement(
                store_cfg, base, specs, plan.evaluation, mode, alphas, split
            )
            return get(job, "diagnose disentanglement")


def write_disentanglement(
    errors: list[list[float]], pair: tuple[str, str], alphas: list[float], mode: str, out: Path
) -> tuple[Path, Path]:
    """``disentanglement-A-B.csv`` (alpha1, alpha2, xi) and the heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"disentanglement-{pair[0]}-{pair[1]}"
    csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["alpha1", "alpha2", "xi"])
        for i, a1 in enumerate(alphas):
            for j, a2 in enumerate(alphas):
                writer.writerow([a1, a2, f"{errors[i][j]:.6f}"])
    figure, axes = plt.subplots(figsize=(5.2, 4.4))
    image = axes.imshow(
        [[errors[i][j] for i in range(len(alphas))] for j in range(len(alphas))],
        origin="lower",
        extent=(alphas[0], alphas[-1], alphas[0], alphas[-1]),
        cmap="viridis",
        vmin=0.0,
        aspect="auto",
    )
    figure.colorbar(image, ax=axes, label="ξ(α1, α2)")
    axes.set_xlabel(f"α1 ({pair[0]})")
    axes.set_ylabel(f"α2 ({pair[1]})")
    axes.set_title(f"weight disentanglement error, {mode} mode")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return csv_path, png_path

"""``mergeline runs`` and ``mergeline report``: past runs from ``runs/*/summary.json``."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from pipelines.report.consoles import output_console

if TYPE_CHECKING:
    from storage.objectstore import ObjectStore

DEFAULT_STORE = "file://.mergeline/store"

StoreOpt = Annotated[
    str, typer.Option("--store", help="The store: file://path or s3://bucket/prefix.")
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        help="S3-compatible server (MinIO, ...); credentials come from the AWS environment.",
    ),
]


def runs_command(
    store: StoreOpt = DEFAULT_STORE,
    endpoint_url: EndpointOpt = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Only the runs of this pipeline (spec name).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List past runs: id, start, status, best candidate, objective, promoted or not."""
    rows = list_runs(open_named_store(store, endpoint_url), name)
    if json_:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return
    table = Table(title=f"runs in {store}")
    columns = ("run", "started", "pipeline", "status", "rebuilt", "best", "objective", "promoted")
    for column in columns:
        table.add_column(column)
    for row in rows:
        score = row["objective_value"]
        objective = "-" if score is None else f"{row['objective']} {score:.4f} (test)"
        table.add_row(
            row["run_id"],
            row["started"] or "-",
            row["pipeline"] or "-",
            row["status"],
            "-" if row["rebuilt"] is None else f"{row['rebuilt']}/{row['tasks']}",
            row["best"] or "-",
            objective,
            {True: "yes", False: "no", None: "-"}[row["promoted"]],
        )
    output_console().print(table)


def report_command(
    run_id: Annotated[str, typer.Argument(help="The run id (see `mergeline runs`).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for index.html and the PNGs.")],
    store: StoreOpt = DEFAULT_STORE,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Write an HTML report of one run with its plots (search, per task, history)."""
    from pipelines.commands.outputs import check_output_directory

    check_output_directory(out, "--out")
    page = write_report(open_named_store(store, endpoint_url), run_id, out)
    output_console().print(f"report of run {run_id} → {page}")


def list_runs(store: ObjectStore, name: str | None = None) -> list[dict[str, Any]]:
    """One row per run directory, oldest first; a run without a summary did not finish, and
    one whose summary is not a readable run summary is listed as corrupt."""
    from storage.errors import ArtifactError
    from storage.runs import list_run_ids, pipeline_name, read_summary, run_prefix

    rows = []
    for run_id in list_run_ids(store):
        try:
            summary = read_summary(store, run_id)
        except ArtifactError:
            summary = None
        if summary is None or not _is_summary(summary):
            if name is None:
                present = summary is not None or store.exists(f"{run_prefix(run_id)}/summary.json")
                rows.append(_without_summary(run_id, "corrupt summary" if present else None))
            continue
        if name is not None and pipeline_name(summary) != name:
            continue
        rows.append(_run_row(summary))
    return rows


def _run_row(summary: dict[str, Any]) -> dict[str, Any]:
    spec = summary.get("spec") or {}
    best = summary.get("best") or {}
    objective = spec.get("objective", "mean_normalized_accuracy")
    aliases = (summary.get("model") or {}).get("aliases") or []
    tasks = summary.get("tasks") or {}
    return {
        "run_id": summary["run_id"],
        "started": summary.get("started") or _start_from_id(summary["run_id"]),
        "pipeline": spec.get("name"),
        "status": summary.get("status", "unknown"),
        "tasks": len(tasks),
        "rebuilt": sum(1 for task in tasks.values() if not task.get("cache_hit")),
        "best": describe_candidate(best),
        "objective": objective,
        "objective_value": (best.get("test") or {}).get(objective),
        "promoted": "champion" in aliases,
        "model_version": (summary.get("model") or {}).get("version"),
    }


def _is_summary(summary: dict[str, Any]) -> bool:
    return isinstance(summary.get("run_id"), str) and isinstance(summary.get("tasks"), dict)


def _without_summary(run_id: str, problem: str | None) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "started": _start_from_id(run_id),
        "pipeline": None,
        "status": problem or "unfinished (no summary)",
        "tasks": 0,
        "rebuilt": None,
        "best": None,
        "objective": None,
        "objective_value": None,
        "promoted": None,
        "model_version": None,
    }


def _start_from_id(run_id: str) -> str | None:
    """Run ids begin with their UTC start, ``YYYYmmdd-HHMMSS``."""
    stamp = run_id[:15]
    if len(stamp) == 15 and stamp[8] == "-" and stamp.replace("-", "").isdigit():
        return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:]}Z"
    return None


def describe_candidate(best: dict[str, Any]) -> str | None:
    """``ties {"density": 0.2} λ=0.4``, or ``λ=a..b`` when the coefficients differ per task."""
    if not best.get("method"):
        return None
    params = f" {json.dumps(best['params'], sort_keys=True)}" if best.get("params") else ""
    values = sorted(set((best.get("coefficients") or {}).values()))
    if not values:
        return best["method"] + params
    shown = f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}..{values[-1]:g}"
    return f"{best['method']}{params} λ={shown}"


# ----------------------------------------------------------------------------- report
def write_report(store: ObjectStore, run_id: str, out: Path) -> Path:
    """``out/index.html`` plus its PNGs for run ``run_id``; returns the page's path."""
    from pipelines.report.plots import draw_search_plots
    from pipelines.report.report_plots import plot_history, plot_task_accuracies
    from storage.errors import ArtifactError
    from storage.runs import list_summaries, pipeline_name, read_candidates, read_summary

    summary = read_summary(store, run_id)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    notes: list[str] = []
    try:
        candidates = read_candidates(store, run_id)
    except ArtifactError as error:
        candidates = None
        notes.append(f"no candidate list, so no search plot: {error}")
    if candidates is not None:
        search = draw_search_plots(
            candidates["rows"],
            candidates["objective"],
            candidates["best_id"],
            best_normalized(summary, candidates),
            out,
        )
        images |= {name: Path(path).name for name, path in search.items()}
    images["task_accuracies"] = Path(
        plot_task_accuracies(summary, out / "task_accuracies.png")
    ).name
    name = pipeline_name(summary)
    history = [s for s in list_summaries(store, name) if s["run_id"] <= run_id] if name else []
    images["history"] = Path(plot_history(history or [summary], out / "history.png")).name
    page = out / "index.html"
    page.write_text(render_html(summary, images, notes, len(history)), encoding="utf-8")
    return page


def best_normalized(summary: dict[str, Any], candidates: dict[str, Any]) -> dict[str, dict]:
    """split -> task -> the chosen candidate's accuracy over the fine-tuned model's."""
    tasks = summary["tasks"]
    best_row = next((r for r in candidates["rows"] if r["id"] == candidates["best_id"]), None)
    accuracy = {"test": summary["best"]["test"]["per_task"]}
    if best_row is not None:
        accuracy = {"val": best_row["accuracy"]} | accuracy
    return {
        split: {
            task: value / max(tasks[task]["finetuned"][split], 1e-12)
            for task, value in values.items()
            if task in tasks
        }
        for split, values in accuracy.items()
    }


_CAPTIONS = {
    "score_vs_coefficient": "Validation objective versus merge coefficient, per method",
    "best_per_task": "The chosen merge: normalized accuracy per task (validation and test)",
    "task_accuracies": "Test accuracy per task: zero-shot, fine-tuned and merged",
    "history": "Normalized test accuracy of this pipeline's runs up to this one",
}


def render_html(
    summary: dict[str, Any], images: dict[str, str], notes: list[str], past_runs: int
) -> str:
    row = _run_row(summary)
    model = summary.get("model") or {}
    promotion = model.get("promotion")
    facts = {
        "run": row["run_id"],
        "started": row["started"],
        "pipeline": row["pipeline"],
        "status": row["status"],
        "mode": summary.get("mode"),
        "best candidate": row["best"],
        "objective (test)": f"{row['objective']} = {row['objective_value']}",
        "model": f"{model.get('registered_model')} v{model.get('version')} → {model.get('uri')}",
        "aliases": ", ".join(model.get("aliases") or []),
        "promotion": promotion.get("reason") if isinstance(promotion, dict) else promotion,
        "runs of this pipeline so far": past_runs,
        "timings (s)": ", ".join(f"{k} {v}" for k, v in (summary.get("timings") or {}).items()),
    }
    merged = summary["best"]["test"]["per_task"]
    task_rows = []
    for task, entry in summary["tasks"].items():
        finetuned = entry["finetuned"]["test"]
        cells = [
            task,
            f"{entry['zero_shot']['test']:.3f}",
            f"{finetuned:.3f}",
            f"{merged[task]:.3f}",
            f"{merged[task] / max(finetuned, 1e-12):.3f}",
            "cache hit" if entry.get("cache_hit") else entry.get("rebuilt_reason") or "rebuilt",
        ]
        task_rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    figures = "\n".join(
        f'<figure><img src="{_e(file)}" alt="{_e(name)}">'
        f"<figcaption>{_e(_CAPTIONS.get(name, name))}</figcaption></figure>"
        for name, file in images.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mergeline run {_e(row["run_id"])}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head><body>
<h1>mergeline run {_e(row["run_id"])}</h1>
<table>{"".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items())}</table>
<h2>Tasks (test split)</h2>
<table><tr><th>task</th><th>zero-shot</th><th>fine-tuned</th><th>merged</th>
<th>normalized</th><th>task vector</th></tr>
{"".join(task_rows)}</table>
{"".join(f"<p><em>{_e(note)}</em></p>" for note in notes)}
<h2>Plots</h2>
{figures}
</body></html>
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def open_named_store(store: str, endpoint_url: str | None) -> ObjectStore:
    """The store a command's ``--store``/``--endpoint-url`` name; one line, exit 2, if it is
    malformed or does not exist."""
    from pydantic import ValidationError

    from pipelines.spec.load import describe_validation_error
    from pipelines.spec.services import StorageSpec
    from storage.errors import SpecError
    from storage.objectstore import open_store

    try:
        checked = StorageSpec(uri=store, endpoint_url=endpoint_url)
    except ValidationError as error:
        message = describe_validation_error(error).replace("field 'uri'", "--store")
        raise SpecError(message.replace("field 'endpoint_url'", "--endpoint-url")) from None
    opened = open_store(checked.uri, checked.endpoint_url, checked.retry_seconds)
    if not opened.exists(""):  # the store's root: a folder, or an S3 prefix holding objects
        opened.list("")  # a missing bucket says so itself (StorageError naming the bucket)
        raise SpecError(
            f"--store {opened.uri} does not exist: name the store that `mergeline run` wrote "
            "(its spec's storage.uri)"
        )
    return opened

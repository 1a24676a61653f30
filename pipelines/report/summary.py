"""The run summary (DESIGN.md's keys) and its terminal table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.spec.plan import Candidate, Plan

#: The summary's ``model`` section; ``version`` is None when the model was not registered.
MODEL_KEYS = ("uri", "mlflow_run_id", "registered_model", "version", "aliases", "promotion")


def build_summary(
    run_id: str,
    plan: Plan,
    tasks: dict[str, dict[str, Any]],
    best: Candidate,
    best_row: dict[str, Any],
    test: dict[str, float],
    test_scores: dict[str, float],
    published: dict[str, Any],
    rows: list[dict[str, Any]],
    timings: dict[str, float],
    search_info: dict[str, Any] | None = None,
    rebuilt: dict[str, str | None] | None = None,
    started: str | None = None,
    skipped: dict[str, str] | None = None,
    scoring: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``rebuilt`` maps each task to why it was fine-tuned (None: a cache hit); ``skipped``
    (under ``finetune.on_task_failure: skip``) each task left out of the merge to why;
    ``scoring``: the metric the scores are in, and the kind's report metrics of the merge on
    test (``{"metric": ..., "report": {metric: {task: score}}}``)."""
    names = plan.task_names
    scoring = scoring or {"metric": "accuracy", "report": {}}
    return {
        "run_id": run_id,
        "status": "succeeded",
        "started": started,
        "spec": {
            "name": plan.spec.name,
            "digest": plan.spec_digest,
            "objective": plan.spec.merge.objective,
            "metric": scoring["metric"],
        },
        "mode": plan.spec.finetune.mode,
        "tasks": {
            name: {
                "task_vector_uri": info["ref"].uri,
                "sha256": info["ref"].sha256,
                "cache_hit": info["cache_hit"],
                "rebuilt_reason": (rebuilt or {}).get(name),
                "zero_shot": dict(info["meta"]["zero_shot"]),
                "finetuned": dict(info["meta"]["finetuned"]),
                **({"report": info["meta"]["report"]} if info["meta"].get("report") else {}),
                **execution_keys(info),
            }
            for name, info in tasks.items()
        },
        "search": {
            "candidates_evaluated": sum(1 for row in rows if not row.get("derived")),
            "seconds": round(timings["search_s"], 3),
            "strategy": "grid",
            **(search_info or {}),  # strategy, per_task, fast_path, surrogate when they apply
        },
        "best": {
            "method": best.method,
            "params": dict(best.params),
            "coefficients": best.coefficients_for(names),
            "val": dict(best_row["objective"]),
            "test": {
                **test_scores,
                "per_task": dict(test),
                **({"report": scoring["report"]} if scoring["report"] else {}),
            },
        },
        "model": {key: published[key] for key in MODEL_KEYS}
        | ({"reused_from": published["reused_from"]} if "reused_from" in published else {}),
        "timings": {key: round(value, 3) for key, value in timings.items()},
    } | ({"skipped": dict(skipped)} if skipped else {})


def execution_keys(info: dict[str, Any]) -> dict[str, Any]:
    """How a task's vector was made in this run: engine, workers, attempts, resumed_from_step.

    A cache hit ran nothing (0 attempts); engine and workers then say how it was built.
    """
    meta, execution = info["meta"], info.get("execution") or {}
    return {
        "engine": execution.get("engine", meta.get("engine", "torch")),
        "workers": execution.get("workers", meta.get("workers", 1)),
        "attempts": execution.get("attempts", 0),
        "resumed_from_step": execution.get("resumed_from_step", 0),
    }


def print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"run {summary['run_id']} ({summary['mode']} mode)")
    for column in ("task", "zero-shot", "fine-tuned", "merged", "normalized", "cache"):
        table.add_column(column, justify="left" if column == "task" else "right")
    best = summary["best"]
    for name, task in summary["tasks"].items():
        merged = best["test"]["per_task"][name]
        table.add_row(
            name,
            f"{task['zero_shot']['test']:.3f}",
            f"{task['finetuned']['test']:.3f}",
            f"{merged:.3f}",
            f"{merged / max(task['finetuned']['test'], 1e-12):.3f}",
            "hit" if task["cache_hit"] else task.get("rebuilt_reason") or "built",
        )
    zero = [
        t["zero_shot"]["test"] / max(t["finetuned"]["test"], 1e-12)
        for t in summary["tasks"].values()
    ]
    table.add_row(
        "[bold]mean",
        "",
        "",
        f"{best['test']['mean_accuracy']:.3f}",
        f"{best['test']['mean_normalized_accuracy']:.3f}",
        "",
    )
    console.print(table)
    coefficients = ", ".join(f"{t}={v:g}" for t, v in best["coefficients"].items())
    console.print(
        f"best: [bold]{best['method']}[/] {best['params'] or ''} coefficients {coefficients}; "
        f"zero-shot normalized {sum(zero) / len(zero):.3f} → merged "
        f"{best['test']['mean_normalized_accuracy']:.3f} (test)"
    )
    model = summary["model"]
    if model["version"] is None:
        console.print(f"[yellow]model not registered[/] → {model['uri']}")
    else:
        verb = "unchanged" if model.get("reused_from") else "published"
        console.print(
            f"{verb} {model['registered_model']} v{model['version']} "
            f"aliases {model['aliases']} → {model['uri']}"
        )
    timings = summary["timings"]
    console.print(
        f"fine-tune {timings['finetune_s']:.1f}s · search {timings['search_s']:.1f}s · "
        f"total {timings['total_s']:.1f}s · {summary['search']['candidates_evaluated']} candidates"
    )

"""The run summary (DESIGN.md's keys) and its terminal table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.plan import Candidate, Plan


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
) -> dict[str, Any]:
    names = plan.task_names
    return {
        "run_id": run_id,
        "status": "succeeded",
        "mode": plan.finetune["mode"],
        "tasks": {
            name: {
                "task_vector_uri": info["ref"].uri,
                "sha256": info["ref"].sha256,
                "cache_hit": info["cache_hit"],
                "zero_shot": dict(info["meta"]["zero_shot"]),
                "finetuned": dict(info["meta"]["finetuned"]),
            }
            for name, info in tasks.items()
        },
        "search": {
            "candidates_evaluated": len(rows),
            "seconds": round(timings["search_s"], 3),
            "strategy": "grid",
        },
        "best": {
            "method": best.method,
            "params": dict(best.params),
            "coefficients": best.coefficients_for(names),
            "val": dict(best_row["objective"]),
            "test": {**test_scores, "per_task": dict(test)},
        },
        "model": {
            key: published[key]
            for key in ("uri", "mlflow_run_id", "registered_model", "version", "aliases")
        },
        "timings": {key: round(value, 3) for key, value in timings.items()},
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
            "hit" if task["cache_hit"] else "built",
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
    console.print(
        f"published {model['registered_model']} v{model['version']} "
        f"aliases {model['aliases']} → {model['uri']}"
    )
    timings = summary["timings"]
    console.print(
        f"fine-tune {timings['finetune_s']:.1f}s · search {timings['search_s']:.1f}s · "
        f"total {timings['total_s']:.1f}s · {summary['search']['candidates_evaluated']} candidates"
    )

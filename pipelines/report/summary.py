"""The run summary (DESIGN.md's keys) and its terminal table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.spec.plan import Candidate, Plan

#: The summary's ``model`` section; ``version`` is None when the model was not registered.
MODEL_KEYS = ("uri", "mlflow_run_id", "registered_model", "version", "aliases", "promotion")


@dataclass(frozen=True)
class RunResult:
    """What a finished run hands the report: the summary is built from this alone."""

    run_id: str
    started: str | None
    plan: Plan
    tasks: dict[str, dict[str, Any]]  # each task's record: ref, meta, cache_hit, execution
    rows: list[dict[str, Any]]  # every scored candidate
    best: Candidate
    test: dict[str, float]  # the best candidate per task on test, in the search metric
    test_scores: dict[str, float]  # the objective's scores of ``test``
    published: dict[str, Any]  # the summary's ``model`` section (+ ``reused_from``)
    timings: dict[str, float]
    search_info: dict[str, Any] = field(default_factory=dict)
    rebuilt: dict[str, str | None] = field(default_factory=dict)  # task -> why (None: cached)
    skipped: dict[str, str] = field(default_factory=dict)  # on_task_failure: skip
    metric: str = "accuracy"  # the metric the scores are in
    report: dict[str, dict[str, float]] = field(default_factory=dict)  # kind's report metrics

    @property
    def best_row(self) -> dict[str, Any]:
        return next(row for row in self.rows if row["id"] == self.best.id)


def build_summary(result: RunResult) -> dict[str, Any]:
    """The run summary (DESIGN.md's keys) of a finished run."""
    plan, best, published, timings = result.plan, result.best, result.published, result.timings
    return {
        "run_id": result.run_id,
        "status": "succeeded",
        "started": result.started,
        "spec": {
            "name": plan.spec.name,
            "digest": plan.spec_digest,
            "objective": plan.spec.merge.objective,
            "metric": result.metric,
        },
        "mode": plan.spec.finetune.mode,
        "tasks": {
            name: {
                "task_vector_uri": info["ref"].uri,
                "sha256": info["ref"].sha256,
                "cache_hit": info["cache_hit"],
                "rebuilt_reason": result.rebuilt.get(name),
                "zero_shot": dict(info["meta"]["zero_shot"]),
                "finetuned": dict(info["meta"]["finetuned"]),
                **({"report": info["meta"]["report"]} if info["meta"].get("report") else {}),
                **execution_keys(info),
            }
            for name, info in result.tasks.items()
        },
        "search": {
            "candidates_evaluated": sum(1 for row in result.rows if not row.get("derived")),
            "seconds": round(timings["search_s"], 3),
            "strategy": "grid",
            **result.search_info,  # strategy, per_task, fast_path, surrogate when they apply
        },
        "best": {
            "method": best.method,
            "params": dict(best.params),
            "coefficients": best.coefficients_for(plan.task_names),
            "val": dict(result.best_row["objective"]),
            "test": {
                **result.test_scores,
                "per_task": dict(result.test),
                **({"report": result.report} if result.report else {}),
            },
        },
        "model": {key: published[key] for key in MODEL_KEYS}
        | ({"reused_from": published["reused_from"]} if "reused_from" in published else {}),
        "timings": {key: round(value, 3) for key, value in timings.items()},
    } | ({"skipped": dict(result.skipped)} if result.skipped else {})


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

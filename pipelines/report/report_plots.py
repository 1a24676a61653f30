"""Plots of finished runs, read from their summaries (matplotlib, Agg backend).

``plot_task_accuracies``: one run's per-task test accuracy of the zero-shot, fine-tuned and
merged models. ``plot_history``: the merged model's normalized accuracy over the past runs of
one pipeline. The search's own plots (score versus coefficient) are :mod:`pipelines.report.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

KINDS = (("zero-shot", "tab:gray"), ("fine-tuned", "tab:blue"), ("merged", "tab:orange"))


def task_accuracies(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> {"zero-shot", "fine-tuned", "merged"}: test accuracies of one run."""
    merged = summary["best"]["test"]["per_task"]
    return {
        task: {
            "zero-shot": float(entry["zero_shot"]["test"]),
            "fine-tuned": float(entry["finetuned"]["test"]),
            "merged": float(merged[task]),
        }
        for task, entry in summary["tasks"].items()
    }


def plot_task_accuracies(summary: dict[str, Any], path: str | Path) -> str:
    """Grouped bars per task: zero-shot, fine-tuned and merged test accuracy."""
    values = task_accuracies(summary)
    tasks = list(values)
    figure, axes = plt.subplots(figsize=(max(5.0, 1.4 * len(tasks) + 2), 4))
    width = 0.8 / len(KINDS)
    for index, (kind, color) in enumerate(KINDS):
        positions = [i + (index - 1) * width for i in range(len(tasks))]
        heights = [values[task][kind] for task in tasks]
        bars = axes.bar(positions, heights, width=width, label=kind, color=color)
        axes.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=1)
    axes.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("test accuracy")
    axes.set_title(f"run {summary['run_id']}: per-task accuracy")
    axes.legend(fontsize="small", loc="lower right")
    return _save(figure, Path(path))


def history_points(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per run with a mean normalized test accuracy, in the given order."""
    points = []
    for summary in summaries:
        test = summary.get("best", {}).get("test", {})
        score = test.get("mean_normalized_accuracy")
        if score is None:
            continue
        finetuned = {t: e["finetuned"]["test"] for t, e in summary["tasks"].items()}
        per_task = {
            task: value / max(finetuned[task], 1e-12)
            for task, value in test.get("per_task", {}).items()
            if task in finetuned
        }
        points.append(
            {
                "run_id": summary["run_id"],
                "score": float(score),
                "per_task": per_task,
                "champion": "champion" in (summary.get("model", {}).get("aliases") or []),
                "rebuilt": sum(1 for e in summary["tasks"].values() if not e.get("cache_hit")),
            }
        )
    return points


def plot_history(summaries: list[dict[str, Any]], path: str | Path) -> str:
    """Mean (and per-task) normalized test accuracy of each run, oldest first.

    Runs that became champion are marked with a star.
    """
    points = history_points(summaries)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.6 * len(points) + 3), 4))
    positions = list(range(len(points)))
    tasks = sorted({task for point in points for task in point["per_task"]})
    for task in tasks:
        pairs = [(i, p["per_task"][task]) for i, p in enumerate(points) if task in p["per_task"]]
        axes.plot(*zip(*pairs, strict=True), lw=1, alpha=0.5, marker=".", label=task)
    axes.plot(
        positions, [p["score"] for p in points], color="black", lw=2, marker="o", label="mean"
    )
    stars = [(i, p["score"]) for i, p in enumerate(points) if p["champion"]]
    if stars:
        axes.scatter(
            *zip(*stars, strict=True),
            marker="*",
            s=220,
            color="gold",
            zorder=3,
            edgecolors="black",
            label="promoted to champion",
        )
    axes.set_xticks(
        positions, [p["run_id"] for p in points], rotation=30, ha="right", fontsize="x-small"
    )
    axes.set_ylabel("normalized accuracy (test)")
    axes.set_title("merged model over past runs")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small")
    return _save(figure, Path(path))


def _save(figure: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)

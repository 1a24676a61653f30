"""The merge search's plots, drawn in the driver (matplotlib, Agg backend) for MLflow.

``score_vs_coefficient``: the objective against the coefficient, one line per method and
params (a per-task coefficient is shown by its mean). ``best_per_task``: the chosen
candidate's normalized accuracy per task on validation and test.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def draw_search_plots(
    rows: list[dict[str, Any]],
    objective: str,
    best_id: str,
    normalized: dict[str, dict[str, float]],
    directory: Path,
) -> dict[str, str]:
    """Write the PNGs into ``directory``; returns {plot name: file path}.

    ``rows`` are the search's rows (method, params, coefficient, objective scores);
    ``normalized`` maps split -> task -> the best candidate's normalized accuracy.
    """
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "score_vs_coefficient": _score_vs_coefficient(rows, objective, best_id, directory),
        "best_per_task": _best_per_task(normalized, directory),
    }


def _coefficient(value: float | dict[str, float]) -> float:
    if isinstance(value, dict):
        return sum(value.values()) / max(len(value), 1)
    return float(value)


def _score_vs_coefficient(
    rows: list[dict[str, Any]], objective: str, best_id: str, directory: Path
) -> str:
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    best: tuple[float, float] | None = None
    for row in rows:
        score = row["objective"].get(objective)
        if score is None:
            continue
        label = row["method"] + (f" {json.dumps(row['params'])}" if row["params"] else "")
        point = (_coefficient(row["coefficient"]), float(score))
        lines[label].append(point)
        if row["id"] == best_id:
            best = point
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(lines.items()):
        points.sort()
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, label=label)
    if best is not None:
        axes.scatter([best[0]], [best[1]], s=120, facecolors="none", edgecolors="black")
        axes.annotate("best", best, textcoords="offset points", xytext=(6, 6))
    axes.set_xlabel("coefficient (mean over tasks when per task)")
    axes.set_ylabel(f"{objective} (validation)")
    axes.set_title("merge search: score vs coefficient")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, directory / "score_vs_coefficient.png")


def _best_per_task(normalized: dict[str, dict[str, float]], directory: Path) -> str:
    splits = list(normalized)
    tasks = sorted({task for values in normalized.values() for task in values})
    figure, axes = plt.subplots(figsize=(max(5, 1.2 * len(tasks) + 2), 4))
    width = 0.8 / max(len(splits), 1)
    for index, split in enumerate(splits):
        positions = [i + (index - (len(splits) - 1) / 2) * width for i in range(len(tasks))]
        heights = [normalized[split].get(task, 0.0) for task in tasks]
        axes.bar(positions, heights, width=width, label=split)
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axes.set_ylabel("normalized accuracy (merged / fine-tuned)")
    axes.set_title("best candidate: per-task normalized accuracy")
    axes.legend()
    return _save(figure, directory / "best_per_task.png")


def _save(figure: Any, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)

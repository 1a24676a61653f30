"""The search run's plots are real PNG images, drawn without a display."""

from __future__ import annotations

from pathlib import Path

from pipelines.report.plots import draw_search_plots

ROWS = [
    {
        "id": f"{method}-{c}",
        "method": method,
        "params": params,
        "coefficient": c,
        "objective": {"mean_normalized_accuracy": score},
    }
    for method, params, c, score in [
        ("task_arithmetic", {}, 0.0, 0.6),
        ("task_arithmetic", {}, 0.5, 0.8),
        ("ties", {"density": 0.2}, 0.5, 0.7),
    ]
] + [
    {
        "id": "per-task",
        "method": "task_arithmetic",
        "params": {},
        "coefficient": {"a": 0.2, "b": 0.6},
        "objective": {"mean_normalized_accuracy": 0.75},
    }
]


def test_both_plots_are_png_files(tmp_path: Path) -> None:
    normalized = {"val": {"a": 0.9, "b": 0.8}, "test": {"a": 0.85, "b": 0.7}}
    plots = draw_search_plots(
        ROWS, "mean_normalized_accuracy", "task_arithmetic-0.5", normalized, tmp_path / "plots"
    )
    assert set(plots) == {"score_vs_coefficient", "best_per_task"}
    for path in plots.values():
        data = Path(path).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000

"""Stages 5-6 (driver side): search the candidates on the scorers, choose one, score it on test."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from pipelines.run.scoring import Scorers, score_best
from pipelines.search.grid import grid_search
from pipelines.search.halving import successive_halving
from pipelines.search.retrieval import best_by_method, per_task_lambda_candidates
from pipelines.search.scorebook import ScoreBook
from pipelines.search.selection import choose_best
from pipelines.search.tangent import TangentSearch
from pipelines.search.warm_start import champion_candidate
from pipelines.spec.plan import Candidate, Plan
from pipelines.spec.search import resolve_search
from pipelines.stages.base import kind_of
from storage.tracking_guard import GuardedTracker


@dataclass
class Choice:
    """The searched candidates' rows, the chosen one and its scores on test."""

    rows: list[dict[str, Any]]
    best: Candidate
    test: dict[str, float]  # per task, in the search metric
    metric: str
    report: dict[str, dict[str, float]]  # the kind's report metrics of the chosen merge
    info: dict[str, Any] = field(default_factory=dict)  # the summary's search section

    @property
    def best_row(self) -> dict[str, Any]:
        return next(row for row in self.rows if row["id"] == self.best.id)


def warn_unnormalizable(finetuned_val: dict[str, float], console: Console) -> None:
    """One line per task whose fine-tuned model scores 0 on val: its normalized accuracy
    divides by zero (by 1e-12), so that task alone decides mean_normalized_accuracy."""
    for task, score in finetuned_val.items():
        if score <= 0:
            console.print(
                f"warning: task '{task}': its fine-tuned model scores {score} on val, so its "
                "normalized accuracy is undefined and outweighs every other task's; consider "
                "merge.objective: mean_accuracy (its task vector stays cached)"
            )


def choose_merge(
    plan: Plan,
    scorers: Scorers,
    book: ScoreBook,
    reference: dict[str, dict[str, Any]],
    tracker: GuardedTracker,
    console: Console,
) -> Choice:
    """Stages 5-6: the spec's search over the plan's candidates (plus the champion, when the
    spec warm-starts from it), the best on val, then its test scores."""
    spec = plan.spec
    finetuned_val = {task: meta["finetuned"]["val"] for task, meta in reference.items()}
    if spec.merge.objective == "mean_normalized_accuracy":
        warn_unnormalizable(finetuned_val, console)
    info: dict[str, Any] = {}
    extra: list[Candidate] = []
    if spec.merge.search.warm_start == "champion":
        champion, info["warm_start"] = champion_candidate(plan, tracker, console)
        extra = [champion] if champion is not None else []
    if resolve_search(spec).tangent:  # linear mode, per-task, surrogate or negation
        outcome = TangentSearch(plan, scorers, reference, extra, book).run()
        rows, best, info = outcome.rows, outcome.best, info | outcome.info
    else:
        ids = {c.id for c in plan.candidates}
        candidates = list(plan.candidates) + [c for c in extra if c.id not in ids]
        if resolve_search(spec).strategy == "successive_halving":
            keep = frozenset(c.id for c in extra)
            rows, halving = successive_halving(
                plan, scorers, finetuned_val, console, candidates, keep, book
            )
            info |= halving
        else:
            rows = grid_search(plan, scorers, finetuned_val, candidates, book=book)
        full = [row for row in rows if row.get("full_split", True)]
        derived = per_task_lambda_candidates(full, finetuned_val)
        rows += [row for _, row in derived]
        full += [row for _, row in derived]
        scores = {row["id"]: row["objective"] for row in full}
        candidates = [c for c in candidates if c.id in scores] + [c for c, _ in derived]
        best = choose_best(candidates, scores, spec.merge.objective)
        console.print(best_by_method(full, spec.merge.objective))
    for row in rows:
        if any(row["id"] == c.id for c in extra):
            row["warm_start"] = "champion"
    test = score_best(scorers, book, best, None, "final evaluation")
    kind = kind_of(plan.base_model)
    metric = plan.spec.evaluation.metric or kind.metrics[0]
    report = {  # the kind's report metrics of the chosen merge (a causal LM's exact match)
        m: score_best(scorers, book, best, m, "final report")
        for m in kind.report_metrics
        if m != metric
    }
    return Choice(rows, best, test, metric, report, info)


def log_search(
    tracker: GuardedTracker, choice: Choice, objective: str, reference: dict[str, dict[str, Any]]
) -> None:
    """The searched candidates as tracking rows and plots, the chosen one as the best."""
    best, best_row = choice.best, choice.best_row
    with tempfile.TemporaryDirectory(prefix="mergeline-plots-") as plot_dir:
        tracker.log_search(
            rows_for_tracking(choice.rows),
            objective,
            {"id": best.id, "method": best.method, **best_row["objective"]},
            plots=search_plots(
                [row for row in choice.rows if row.get("full_split", True)],
                objective,
                best,
                choice.test,
                reference,
                plot_dir,
            ),
        )


def rows_for_tracking(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows (one column per value) for the candidates CSV and metric rows."""
    flat = []
    for row in rows:
        item: dict[str, Any] = {"id": row["id"], "method": row["method"]}
        item |= {f"param.{k}": v for k, v in row["params"].items()}
        coefficient = row["coefficient"]
        if isinstance(coefficient, dict):
            item |= {f"coefficient.{k}": v for k, v in coefficient.items()}
        else:
            item["coefficient"] = coefficient
        item |= {f"val_accuracy.{k}": v for k, v in row["accuracy"].items()}
        item |= row["objective"]
        if "rows_scored" in row:  # successive halving: how far the candidate got
            item["rows_scored"] = row["rows_scored"]
        flat.append(item)
    return flat


def search_plots(
    rows: list[dict[str, Any]],
    objective: str,
    best: Candidate,
    test: dict[str, float],
    reference: dict[str, dict[str, Any]],
    directory: str,
) -> dict[str, str]:
    """PNGs for the search run: score vs coefficient, the best's per-task normalized accuracy."""
    from pipelines.report.plots import draw_search_plots

    best_row = next(row for row in rows if row["id"] == best.id)
    normalized = {
        split: {
            task: value / max(reference[task]["finetuned"][split], 1e-12)
            for task, value in accuracy.items()
        }
        for split, accuracy in (("val", best_row["accuracy"]), ("test", test))
    }
    return draw_search_plots(rows, objective, best.id, normalized, Path(directory))

"""Stage 4b (driver side): the data statistics the data-aware candidates read, on Ray."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console

from pipelines.report.progress import progress_bar
from pipelines.run.dag import submit_statistics
from pipelines.run.raysession import get, wait_any
from pipelines.spec.plan import Plan, statistics_needs
from pipelines.spec.refs import BaseModelRef, DatasetRef, TaskVectorRef
from pipelines.stages.jobs import StatisticsJob
from storage.objectstore import ObjectStore
from storage.taskvectors import find_statistics


def compute_statistics(
    plan: Plan,
    store: ObjectStore,
    store_cfg: dict[str, Any],
    base: BaseModelRef,
    vectors: dict[str, TaskVectorRef],
    console: Console,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Stage 4b: one Ray task per task vector that lacks some statistic (stored ones of the
    same task vector are reused; ``ready`` starts Ray before the first task)."""
    needs = statistics_needs(plan.candidates)
    if not needs:
        return
    pending = {}
    for name, vector in vectors.items():
        missing = [
            need
            for need in needs
            if find_statistics(store, vector.key, *need, vector.sha256) is None
        ]
        if missing:
            dataset = DatasetRef(name, plan.task(name).dataset, vector.meta.get("dataset_digest"))
            job = StatisticsJob(store_cfg, vector, dataset, base, plan.evaluation, tuple(missing))
            ready()
            pending[submit_statistics(plan, job)] = name
    labels = ", ".join(f"{kind} (n={rows})" for kind, rows in needs)
    computed = len(pending)
    with progress_bar(console) as progress:
        bar = progress.add_task(f"statistics: {labels}", total=len(vectors))
        progress.advance(bar, len(vectors) - computed)
        while pending:
            done = wait_any(list(pending))
            get(done[0], f"statistics of '{pending.pop(done[0])}'")
            progress.advance(bar)
    console.print(f"  statistics {labels}: {computed} computed, {len(vectors) - computed} cached")

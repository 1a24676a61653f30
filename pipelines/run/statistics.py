"""Stage 4b (driver side): the data statistics the data-aware candidates read, on Ray."""

from __future__ import annotations

from pipelines.report.progress import progress_bar
from pipelines.run.context import RunContext
from pipelines.run.dag import submit_statistics
from pipelines.run.raysession import get, wait_any
from pipelines.spec.plan import Plan, statistics_needs
from pipelines.spec.refs import BaseModelRef, DatasetRef, TaskVectorRef
from pipelines.stages.jobs import StatisticsJob
from storage.taskvectors import find_statistics


def compute_statistics(
    ctx: RunContext, plan: Plan, base: BaseModelRef, vectors: dict[str, TaskVectorRef]
) -> None:
    """Stage 4b: one Ray task per task vector that lacks some statistic (stored ones of the
    same task vector are reused; ``ctx.ready`` starts Ray before the first task)."""
    store, store_cfg, console, ready = ctx.store, ctx.store_cfg, ctx.console, ctx.ready
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

"""``mergeline run``: the seven stages of DESIGN.md, executed on Ray from a validated spec."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from pipelines.report.summary import RunResult, build_summary
from pipelines.run.choose import choose_merge, log_search
from pipelines.run.context import RunContext
from pipelines.run.dag import start_scorers
from pipelines.run.finetune import finetune_all, log_finetune, prepare_base, task_vectors
from pipelines.run.fingerprint import fingerprint_datasets, fingerprint_pretrain, key_digests
from pipelines.run.incremental import rebuilt_reasons
from pipelines.run.publish import publish
from pipelines.run.raysession import LazyRay, check_reachable
from pipelines.run.recovery import run_key, without_tasks
from pipelines.run.resources import await_placement, refuse_impossible
from pipelines.run.scoring import Scorers, open_score_book
from pipelines.run.statistics import compute_statistics
from pipelines.search.halving import check_budget
from pipelines.search.tangent import task_scores
from pipelines.spec.pipeline import Spec
from pipelines.spec.plan import Plan, code_version, make_plan
from storage.objectstore import open_store
from storage.runs import latest_summary, write_candidates, write_scores
from storage.runstate import begin_run, finish_run
from storage.taskvectors import write_summary
from storage.tracking import MlflowTracker
from storage.tracking_guard import GuardedTracker
from workers.data import Splits


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def run_pipeline(spec: Spec, console: Console, summary_path: Path | None = None) -> dict[str, Any]:
    """``mergeline run``: check what can be checked without services, open the run (a crashed
    one is continued), then the stages in order; the summary is written last."""
    plan = make_plan(spec)
    compute = spec.compute
    requests = refuse_impossible(plan, compute.ray_address, compute.num_cpus)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    started = time.perf_counter()
    store = open_store(spec.storage.uri, spec.storage.endpoint_url, spec.storage.retry_seconds)
    datasets = fingerprint_datasets(plan)  # bad data fails before any service is touched
    check_budget(plan, {name: len(data.y_val) for name, data in datasets.items()})
    base_key = fingerprint_pretrain(plan, datasets)
    # The same command after a crash continues the same run (same id, one registry version).
    digests = key_digests(plan, datasets)
    resume_key = run_key(plan, digests, base_key)
    run_id, starts = begin_run(store, resume_key, new_run_id())
    if starts > 1:
        console.print(f"resuming run {run_id} (start {starts}): finished work is reused")
    if compute.ray_address:
        check_reachable(compute.ray_address)
    tracker = GuardedTracker(
        MlflowTracker(spec.tracking.uri, spec.tracking.experiment),
        spec.tracking.on_error,
        lambda message: console.print(f"[yellow]warning:[/] {message}", soft_wrap=True),
    )
    tracker.check()  # an unreachable tracking server fails before any fine-tuning starts
    console.print(
        f"[bold]mergeline[/] run [cyan]{run_id}[/] · spec '{spec.name}' · "
        f"{len(plan.tasks)} tasks · {len(plan.candidates)} candidates"
    )
    version = code_version()
    tags = {
        "mergeline.run_id": run_id,
        "mergeline.spec_digest": plan.spec_digest,
        "mergeline.code_version": version,
        "mergeline.spec_name": spec.name,
    }

    def placed() -> None:
        await_placement(requests, compute.ray_address, compute.placement_timeout_s)

    with (
        LazyRay(compute.ray_address, compute.num_cpus, placed) as cluster,
        tracker.pipeline_run(run_id, tags),
    ):
        store_cfg = {
            "uri": store.uri,
            "endpoint_url": spec.storage.endpoint_url,
            "retry_seconds": spec.storage.retry_seconds,
        }
        ctx = RunContext(run_id, store, store_cfg, console, tracker, version, cluster.ensure)
        input_dim = next(iter(datasets.values())).input_dim
        result = run_stages(ctx, plan, base_key, input_dim, datasets, digests, started_at)
        timings = result.timings | {"total_s": time.perf_counter() - started}
        summary = build_summary(replace(result, timings=timings))
        console.print(f"promotion: {result.published['promotion']['reason']}")
        if not cluster.started:
            console.print("Ray was not started: every artifact and score the run needed was stored")
        write_candidates(store, run_id, spec.merge.objective, result.best.id, result.rows)
        write_summary(store, run_id, summary)
        finish_run(store, resume_key, run_id)
        tracker.log_summary(summary)
    if summary_path:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def run_stages(
    ctx: RunContext,
    plan: Plan,
    base_key: str,
    input_dim: int,
    datasets: dict[str, Splits],
    digests: dict[str, str],
    started_at: str,
) -> RunResult:
    """Stages 1b-7 of an opened run: base, task vectors, statistics, search, publish."""
    timings: dict[str, float] = {}
    # Stages 1b-4: the base, the task vectors and their statistics.
    base = prepare_base(ctx, plan, base_key, input_dim)
    t0 = time.perf_counter()
    tasks = finetune_all(ctx, plan, base, datasets, digests)
    skipped = {name: info["skipped"] for name, info in tasks.items() if "skipped" in info}
    tasks = {name: info for name, info in tasks.items() if name not in skipped}
    plan = without_tasks(plan, skipped)  # finetune.on_task_failure: skip
    rebuilt = rebuilt_reasons(ctx.store, plan.spec.name, tasks)
    for name, reason in rebuilt.items():
        if reason:
            ctx.console.print(f"  {name} rebuilt: {reason}")
    vectors = task_vectors(tasks)
    compute_statistics(ctx, plan, base, vectors)
    timings["finetune_s"] = time.perf_counter() - t0
    for name, info in tasks.items():
        log_finetune(ctx.tracker, name, info, datasets[name], plan)

    # Stages 5-6: score the candidates, choose one.
    t0 = time.perf_counter()
    previous = latest_summary(ctx.store, plan.spec.name, before=ctx.run_id)  # scores, model
    previous_run = previous["run_id"] if previous else None
    book = open_score_book(ctx.store, previous_run, ctx.run_id, ctx.version, base.meta, tasks, plan)

    def start_actors() -> list[Any]:
        ctx.ready()
        return start_scorers(plan, ctx.store_cfg, base.key, base.meta, tasks)

    scorers = Scorers(start_actors, ctx.console)
    reference = {name: vector.meta for name, vector in vectors.items()}
    choice = choose_merge(plan, scorers, book, reference, ctx.tracker, ctx.console)
    scorers.close()  # give their CPUs back to the publish stage
    write_scores(ctx.store, ctx.run_id, book.record())  # before publish: a resume reuses them
    choice.info |= book.counts()
    timings["search_s"] = time.perf_counter() - t0
    log_search(ctx.tracker, choice, plan.spec.merge.objective, reference)

    # Stage 7: publish.
    test_scores = task_scores(plan.spec, choice.test, reference, "test")
    published = publish(ctx, plan, base, vectors, choice.best, test_scores, previous_run)
    return RunResult(
        run_id=ctx.run_id,
        started=started_at,
        plan=plan,
        tasks=tasks,
        rows=choice.rows,
        best=choice.best,
        test=choice.test,
        test_scores=test_scores,
        published=published,
        timings=timings,
        search_info=choice.info,
        rebuilt=rebuilt,
        skipped=skipped,
        metric=choice.metric,
        report=choice.report,
    )

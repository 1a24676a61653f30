"""``mergeline run``: the seven stages of DESIGN.md, executed on Ray from a validated spec."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from pipelines.report.summary import build_summary
from pipelines.run.choose import choose_merge, log_search
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
from pipelines.spec.plan import code_version, make_plan
from storage.objectstore import open_store
from storage.runs import latest_summary, write_candidates, write_scores
from storage.runstate import begin_run, finish_run
from storage.taskvectors import write_summary
from storage.tracking import MlflowTracker
from storage.tracking_guard import GuardedTracker


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def run_pipeline(spec: Spec, console: Console, summary_path: Path | None = None) -> dict[str, Any]:
    plan = make_plan(spec)
    compute = spec.compute
    requests = refuse_impossible(plan, compute.ray_address, compute.num_cpus)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    timings: dict[str, float] = {}
    started = time.perf_counter()
    store = open_store(spec.storage.uri, spec.storage.endpoint_url, spec.storage.retry_seconds)
    store_cfg = {
        "uri": store.uri,
        "endpoint_url": spec.storage.endpoint_url,
        "retry_seconds": spec.storage.retry_seconds,
    }
    datasets = fingerprint_datasets(plan)  # bad data fails before any service is touched
    check_budget(plan, {name: len(data.y_val) for name, data in datasets.items()})
    base_key = fingerprint_pretrain(plan, datasets)
    input_dim = next(iter(datasets.values())).input_dim
    # The same command after a crash continues the same run (same id, one registry version).
    digests = key_digests(plan, datasets)
    resume_key = run_key(plan, digests, base_key)
    run_id, starts = begin_run(store, resume_key, new_run_id())
    if starts > 1:
        console.print(f"resuming run {run_id} (start {starts}): finished work is reused")
    if spec.compute.ray_address:
        check_reachable(spec.compute.ray_address)
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
        # Stages 1b-4: the base, the task vectors and their statistics.
        base = prepare_base(plan, store_cfg, base_key, input_dim, console, cluster.ensure)
        t0 = time.perf_counter()
        tasks = finetune_all(
            plan, store, store_cfg, base, datasets, console, digests, cluster.ensure
        )
        skipped = {name: info["skipped"] for name, info in tasks.items() if "skipped" in info}
        tasks = {name: info for name, info in tasks.items() if name not in skipped}
        plan = without_tasks(plan, skipped)  # finetune.on_task_failure: skip
        spec = plan.spec
        rebuilt = rebuilt_reasons(store, spec.name, tasks)
        for name, reason in rebuilt.items():
            if reason:
                console.print(f"  {name} rebuilt: {reason}")
        vectors = task_vectors(tasks)
        compute_statistics(plan, store, store_cfg, base, vectors, console, cluster.ensure)
        timings["finetune_s"] = time.perf_counter() - t0
        for name, info in tasks.items():
            log_finetune(tracker, name, info, datasets[name], plan)

        # Stages 5-6: score the candidates, choose one.
        t0 = time.perf_counter()
        previous = latest_summary(store, spec.name, before=run_id)  # scores, model to reuse
        previous_run = previous["run_id"] if previous else None
        book = open_score_book(store, previous_run, run_id, version, base.meta, tasks, plan)

        def start_actors() -> list[Any]:
            cluster.ensure()
            return start_scorers(plan, store_cfg, base.key, base.meta, tasks)

        scorers = Scorers(start_actors, console)
        reference = {name: vector.meta for name, vector in vectors.items()}
        choice = choose_merge(plan, scorers, book, reference, tracker, console)
        scorers.close()  # give their CPUs back to the publish stage
        write_scores(store, run_id, book.record())  # before publish: a resumed run reuses them
        choice.info |= book.counts()
        timings["search_s"] = time.perf_counter() - t0
        log_search(tracker, choice, spec.merge.objective, reference)

        # Stage 7: publish, then the summary (written last).
        test_scores = task_scores(spec, choice.test, reference, "test")
        published = publish(
            plan,
            run_id,
            store,
            store_cfg,
            tracker,
            base,
            vectors,
            choice.best,
            test_scores,
            version,
            previous_run,
            cluster.ensure,
        )
        timings["total_s"] = time.perf_counter() - started
        summary = build_summary(
            run_id,
            plan,
            tasks,
            choice.best,
            choice.best_row,
            choice.test,
            test_scores,
            published,
            choice.rows,
            timings,
            choice.info,
            rebuilt,
            started_at,
            skipped,
            {"metric": choice.metric, "report": choice.report},
        )
        console.print(f"promotion: {published['promotion']['reason']}")
        if not cluster.started:
            console.print("Ray was not started: every artifact and score the run needed was stored")
        write_candidates(store, run_id, spec.merge.objective, choice.best.id, choice.rows)
        write_summary(store, run_id, summary)
        finish_run(store, resume_key, run_id)
        tracker.log_summary(summary)
    if summary_path:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1))
    return summary

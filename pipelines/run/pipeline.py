"""``mergeline run``: the seven stages of DESIGN.md, executed on Ray from a validated spec."""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from pipelines.report.progress import progress_bar
from pipelines.report.summary import build_summary
from pipelines.run.cache import trusted_artifacts
from pipelines.run.incremental import rebuilt_reasons
from pipelines.run.publish import publish
from pipelines.run.raysession import LazyRay, check_reachable, get, wait_any
from pipelines.run.recovery import run_key, task_failed, without_tasks
from pipelines.run.resources import await_placement, refuse_impossible
from pipelines.run.scheduling import actor_options, finetune_options
from pipelines.run.scoring import Scorers, open_score_book, score_best, start_scorers
from pipelines.search.grid import grid_search
from pipelines.search.halving import check_budget, successive_halving
from pipelines.search.retrieval import best_by_method, per_task_lambda_candidates
from pipelines.search.selection import choose_best
from pipelines.search.tangent import TangentSearch, task_scores
from pipelines.search.warm_start import champion_candidate
from pipelines.spec.pipeline import Spec
from pipelines.spec.plan import (
    Candidate,
    Plan,
    base_model_key,
    code_version,
    make_plan,
    statistics_needs,
    task_vector_key,
)
from pipelines.spec.search import resolve_search
from pipelines.stages.base import kind_of, pretrain_base_job
from pipelines.stages.datasets import load_dataset
from pipelines.stages.finetune import run_finetune_job
from pipelines.stages.statistics import statistics_job
from storage.errors import DataError, MergelineError, ModelError, SystemFailure
from storage.objectstore import open_store, open_store_from
from storage.runs import latest_summary, write_candidates, write_scores
from storage.runstate import begin_run, finish_run
from storage.taskvectors import (
    base_model_prefix,
    find_statistics,
    find_task_vector,
    task_vector_prefix,
    write_summary,
)
from storage.tracking import DatasetInfo, MlflowTracker
from storage.tracking_guard import GuardedTracker
from workers.data import Splits


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
        base_key, base_meta = prepare_base(
            plan, store_cfg, base_key, input_dim, console, cluster.ensure
        )
        t0 = time.perf_counter()
        tasks = finetune_all(
            plan, store, store_cfg, base_key, base_meta, datasets, console, digests, cluster.ensure
        )
        skipped = {name: info["skipped"] for name, info in tasks.items() if "skipped" in info}
        tasks = {name: info for name, info in tasks.items() if name not in skipped}
        plan = without_tasks(plan, skipped)  # finetune.on_task_failure: skip
        spec = plan.spec
        rebuilt = rebuilt_reasons(store, spec.name, tasks)
        for name, reason in rebuilt.items():
            if reason:
                console.print(f"  {name} rebuilt: {reason}")
        compute_statistics(
            plan, store, store_cfg, base_key, base_meta, tasks, console, cluster.ensure
        )
        timings["finetune_s"] = time.perf_counter() - t0
        for name, info in tasks.items():
            log_finetune(tracker, name, info, datasets[name], plan)

        t0 = time.perf_counter()
        finetuned_val = {t: info["meta"]["finetuned"]["val"] for t, info in tasks.items()}
        previous = latest_summary(store, spec.name, before=run_id)  # scores, model to reuse
        previous_run = previous["run_id"] if previous else None
        book = open_score_book(store, previous_run, run_id, version, base_meta, tasks, plan)

        def start_actors() -> list[Any]:
            cluster.ensure()
            return start_scorers(plan, store_cfg, base_key, base_meta, tasks)

        scorers = Scorers(start_actors, console)
        reference = {t: info["meta"] for t, info in tasks.items()}
        search_info: dict[str, Any] = {}
        extra: list[Candidate] = []
        if spec.merge.search.warm_start == "champion":
            champion, search_info["warm_start"] = champion_candidate(plan, tracker, console)
            extra = [champion] if champion is not None else []
        if resolve_search(spec).tangent:  # linear mode, per-task, surrogate or negation
            outcome = TangentSearch(plan, scorers, reference, extra, book).run()
            rows, best, search_info = outcome.rows, outcome.best, search_info | outcome.info
        else:
            ids = {c.id for c in plan.candidates}
            candidates = list(plan.candidates) + [c for c in extra if c.id not in ids]
            if resolve_search(spec).strategy == "successive_halving":
                keep = frozenset(c.id for c in extra)
                rows, info = successive_halving(
                    plan, scorers, finetuned_val, console, candidates, keep, book
                )
                search_info |= info
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
        metric = plan.evaluation.get("metric") or kind.metrics[0]
        report = {  # the kind's report metrics of the chosen merge (a causal LM's exact match)
            m: score_best(scorers, book, best, m, "final report")
            for m in kind.report_metrics
            if m != metric
        }
        scorers.close()  # give their CPUs back to the publish stage
        write_scores(store, run_id, book.record())  # before publish: a resumed run reuses them
        search_info |= book.counts()
        timings["search_s"] = time.perf_counter() - t0
        best_row = next(row for row in rows if row["id"] == best.id)
        with tempfile.TemporaryDirectory(prefix="mergeline-plots-") as plot_dir:
            tracker.log_search(
                rows_for_tracking(rows),
                spec.merge.objective,
                {"id": best.id, "method": best.method, **best_row["objective"]},
                plots=search_plots(
                    [row for row in rows if row.get("full_split", True)],
                    spec.merge.objective,
                    best,
                    test,
                    reference,
                    plot_dir,
                ),
            )

        test_scores = task_scores(spec, test, reference, "test")
        published = publish(
            plan,
            run_id,
            store,
            store_cfg,
            tracker,
            base_key,
            base_meta,
            tasks,
            best,
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
            best,
            best_row,
            test,
            test_scores,
            published,
            rows,
            timings,
            search_info,
            rebuilt,
            started_at,
            skipped,
            {"metric": metric, "report": report},
        )
        console.print(f"promotion: {published['promotion']['reason']}")
        if not cluster.started:
            console.print("Ray was not started: every artifact and score the run needed was stored")
        write_candidates(store, run_id, spec.merge.objective, best.id, rows)  # summary last
        write_summary(store, run_id, summary)
        finish_run(store, resume_key, run_id)
        tracker.log_summary(summary)
    if summary_path:
        import json

        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def fingerprint_datasets(plan: Plan) -> dict[str, Splits]:
    """Stage 1: materialise every task's splits and check they can share one backbone."""
    datasets = {
        t.name: load_dataset(t.dataset, plan.evaluation, f"tasks[{i}].dataset")
        for i, t in enumerate(plan.tasks)
    }
    dims = {name: data.input_dim for name, data in datasets.items()}
    if len(set(dims.values())) > 1:
        raise DataError(
            f"tasks have different feature dimensions {dims}: every task must feed "
            "the same base model"
        )
    return datasets


def key_digests(plan: Plan, datasets: dict[str, Splits]) -> dict[str, str]:
    """Each task's data digest for the cache keys: its content, or for prompt / completion
    data the rendered token ids, so another chat template, max_length or overflow (the base's
    weights unchanged) gives another task vector instead of a stale one."""
    if not any(data.is_prompts for data in datasets.values()):
        return {name: data.digest() for name, data in datasets.items()}
    from pipelines.stages.model_dirs import resolve_model_dir
    from workers.data.prompts import encode_splits
    from workers.models import huggingface as hf

    config = plan.base_model
    gguf = config.get("gguf_file")
    directory = resolve_model_dir(
        config["model"], config.get("revision"), config.get("endpoint_url"), gguf
    )
    tokenizer = hf.load_tokenizer(directory) if gguf is None else _gguf_tokenizer(directory, gguf)
    digests = {}
    for index, task in enumerate(plan.tasks):
        data = datasets[task.name]
        if data.is_prompts:
            overflow = task.dataset.get("overflow", "refuse")
            what = f"tasks[{index}].dataset"
            data, _ = encode_splits(data, tokenizer, int(config["max_length"]), overflow, what)
        digests[task.name] = data.digest()
    return digests


def _gguf_tokenizer(directory: Path, gguf_file: str) -> Any:
    """The tokenizer inside a GGUF file (a path, or a name inside ``directory``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), gguf_file=gguf_file, local_files_only=True
        )
    except Exception as error:  # a corrupt or unsupported file: one line, not a traceback
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ModelError(
            f"base_model.gguf_file: no usable tokenizer in {gguf_file!r} ({first})"
        ) from None


def fingerprint_pretrain(plan: Plan, datasets: dict[str, Splits]) -> str:
    """Stage 1: the base model's cache key: its config and the digest of what it is made of
    (the pretraining data of a builtin base, the files of a Hugging Face one)."""
    if plan.base_model["source"] == "hf":
        from pipelines.stages.model_dirs import resolve_model_dir
        from workers.models import huggingface as hf

        config = plan.base_model
        gguf = config.get("gguf_file")
        directory = resolve_model_dir(
            config["model"], config.get("revision"), config.get("endpoint_url"), gguf
        )
        digest = hf.directory_digest(directory, gguf)
        return base_model_key(config, f"{digest}/{hf.DIGEST_RULE}")
    pretrain = plan.base_model.get("pretrain")
    input_dim = next(iter(datasets.values())).input_dim
    pretrain_digest = None
    if pretrain:
        pretrain_data = load_dataset(
            pretrain["dataset"], plan.evaluation, "base_model.pretrain.dataset"
        )
        if pretrain_data.input_dim != input_dim:
            raise DataError(
                f"base_model.pretrain.dataset has {pretrain_data.input_dim} features "
                f"but the tasks have {input_dim}: pretrain on data of the same shape"
            )
        pretrain_digest = pretrain_data.digest()
    return base_model_key(plan.base_model, pretrain_digest)


def prepare_base(
    plan: Plan,
    store_cfg: dict[str, Any],
    key: str,
    input_dim: int,
    console: Console,
    ready: Callable[[], None] = lambda: None,
) -> tuple[str, dict[str, Any]]:
    """Stage 1b: the base model from the store, else built (and pretrained) by a Ray task;
    ``ready`` starts Ray when it has not started yet."""
    store = open_store_from(store_cfg)
    # A cached base that fails its checksum is reported and made invisible: the job rebuilds it.
    cached = trusted_artifacts(
        store, store_cfg, {"base": base_model_prefix(key)}, console, "base model"
    )
    if "base" in cached:
        meta = dict(cached["base"].meta)
        console.print(f"base model {meta['digest'][:12]} (cache hit)")
        return key, meta
    ready()
    with console.status("base model: pretraining (cached after the first run)"):
        job = ray.remote(pretrain_base_job).options(num_cpus=1, max_retries=2)
        meta = get(
            job.remote(store_cfg, key, plan.base_model, plan.evaluation, input_dim), "base model"
        )
    state = "cache hit" if meta.pop("cache_hit") else f"pretrained in {meta['seconds']:.1f}s"
    console.print(f"base model {meta['digest'][:12]} ({state})")
    return key, meta


def finetune_all(
    plan: Plan,
    store,
    store_cfg: dict[str, Any],
    base_key: str,
    base_meta: dict[str, Any],
    datasets: dict[str, Splits],
    console: Console,
    digests: dict[str, str] | None = None,
    ready: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, Any]]:
    """Stages 2-4: one Ray task per task whose vector is not in the store yet. ``digests``:
    :func:`key_digests` of ``datasets``, if the caller has them already; ``ready`` starts Ray
    before the first task (a run whose vectors are all stored does not need it)."""
    job = ray.remote(run_finetune_job).options(**finetune_options(plan))
    results: dict[str, dict[str, Any]] = {}
    pending: dict[Any, str] = {}
    kind = kind_of(plan.base_model)
    digests = digests or key_digests(plan, datasets)
    keys = {
        t.name: task_vector_key(
            base_meta["digest"],
            digests[t.name],
            plan.finetune,
            kind.key_settings(plan.evaluation, t.dataset),
        )
        for t in plan.tasks
    }
    prefixes = {name: task_vector_prefix(key) for name, key in keys.items()}
    cached = trusted_artifacts(store, store_cfg, prefixes, console)  # corrupt ones: rebuilt
    for task in plan.tasks:
        key = keys[task.name]
        existing = cached.get(task.name)
        if existing is not None:
            results[task.name] = {
                "key": key,
                "ref": existing,
                "meta": existing.meta,
                "cache_hit": True,
            }
            continue
        ready()
        ref = job.remote(
            store_cfg,
            key,
            task.name,
            task.dataset,
            plan.evaluation,
            base_key,
            base_meta,
            plan.finetune,
        )
        pending[ref] = task.name
        results[task.name] = {"key": key, "cache_hit": False}
    with progress_bar(console) as progress:
        bar = progress.add_task(
            "fine-tune", total=len(plan.tasks), completed=len(plan.tasks) - len(pending)
        )
        while pending:
            done = wait_any(list(pending))
            name = pending.pop(done[0])
            try:
                results[name]["execution"] = get(done[0], f"fine-tune '{name}'")
            except MergelineError as error:  # fail the run, or skip the task (on_task_failure)
                policy = plan.finetune["on_task_failure"]
                results[name]["skipped"] = task_failed(name, error, policy, list(pending))
            progress.advance(bar)
    for name, info in results.items():
        if "skipped" in info:
            console.print(f"  {name}: skipped ({info['skipped']})", soft_wrap=True)
            continue
        if not info["cache_hit"]:
            info["ref"] = find_task_vector(store, info["key"])
            if info["ref"] is None:  # written by the job, gone now: the store lost it
                missing = store.url(task_vector_prefix(info["key"]))
                raise SystemFailure(f"fine-tune '{name}'", f"{missing} is gone from the store")
            info["meta"] = info["ref"].meta
        console.print(
            f"  {name}: {'cache hit' if info['cache_hit'] else 'fine-tuned'} → {info['ref'].uri}"
        )
    return {task.name: results[task.name] for task in plan.tasks}


def compute_statistics(
    plan: Plan,
    store,
    store_cfg: dict[str, Any],
    base_key: str,
    base_meta: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
    console: Console,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Stage 4b: the statistics the data-aware candidates read, one Ray task per task vector
    that lacks some (stored ones of the same task vector are reused; ``ready`` starts Ray
    before the first task)."""
    needs = statistics_needs(plan.candidates)
    if not needs:
        return
    job = ray.remote(statistics_job).options(**actor_options(plan), max_retries=2)
    base = {"key": base_key, "meta": base_meta}
    pending = {}
    for name, info in tasks.items():
        vector = {"key": info["key"], "sha256": info["ref"].sha256}
        missing = [
            need
            for need in needs
            if find_statistics(store, vector["key"], *need, vector["sha256"]) is None
        ]
        if missing:
            dataset = plan.tasks[plan.task_names.index(name)].dataset
            ready()
            ref = job.remote(store_cfg, name, vector, dataset, plan.evaluation, base, missing)
            pending[ref] = name
    labels = ", ".join(f"{kind} (n={rows})" for kind, rows in needs)
    computed = len(pending)
    with progress_bar(console) as progress:
        bar = progress.add_task(f"statistics: {labels}", total=len(tasks))
        progress.advance(bar, len(tasks) - computed)
        while pending:
            done = wait_any(list(pending))
            get(done[0], f"statistics of '{pending.pop(done[0])}'")
            progress.advance(bar)
    console.print(f"  statistics {labels}: {computed} computed, {len(tasks) - computed} cached")


def log_finetune(
    tracker: GuardedTracker, name: str, info: dict[str, Any], data: Splits, plan: Plan
) -> None:
    meta = info["meta"]
    metrics = {
        f"{kind}_{split}_accuracy": meta[kind][split]
        for kind in ("zero_shot", "finetuned")
        for split in ("val", "test")
    }
    metrics |= {"final_loss": meta["final_loss"], "seconds": meta["seconds"]}
    dataset = DatasetInfo(
        name=name,
        source=str(plan.tasks[plan.task_names.index(name)].dataset),
        digest=meta["dataset_digest"],
        num_rows=data.num_rows,
    )
    tags = {
        "mergeline.task": name,
        "mergeline.task_vector_uri": info["ref"].uri,
        "mergeline.task_vector_sha256": info["ref"].sha256,
        "mergeline.cache_hit": str(info["cache_hit"]).lower(),
        "mergeline.mode": meta["mode"],
    }
    history = [{"step": i, "loss": v} for i, v in enumerate(meta.get("loss_history", []))]
    tracker.log_finetune(
        name, {k: v for k, v in meta["finetune"].items()}, metrics, dataset, tags, history
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

"""Stage 7 (driver side): merged model to the store, MLflow logged model, registry, aliases."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipelines.run.context import RunContext
from pipelines.run.dag import submit_publish, transformers_logger
from pipelines.run.raysession import get
from pipelines.search.selection import champion_score, decide_promotion
from pipelines.spec.plan import Candidate, Plan
from pipelines.spec.refs import BaseModelRef, MergedModelRef, TaskVectorRef
from pipelines.stages.base import kind_of
from pipelines.stages.jobs import PublishJob
from storage.artifacts import find_artifact, read_manifest
from storage.digest import digest_json
from storage.objectstore import FsspecStore
from storage.stored_model import reference_files
from storage.taskvectors import model_prefix
from storage.tracking_guard import GuardedTracker
from workers.kinds.registry import TRANSFORMERS

# The MLflow models-from-code files (storage/ is the only package that touches MLflow).
SERVING_CODE = Path(__file__).parents[2] / "storage" / "serving.py"
SERVING_TEXT_CODE = Path(__file__).parents[2] / "storage" / "serving_text.py"  # HF base: texts in


def publish(
    ctx: RunContext,
    plan: Plan,
    base: BaseModelRef,
    vectors: dict[str, TaskVectorRef],
    best: Candidate,
    test_scores: dict[str, float],
    previous_run: str | None = None,
) -> dict[str, Any]:
    """Stage 7. The merged model is built by a Ray task (``ctx.ready`` starts Ray first),
    unless the pipeline's previous run (``previous_run``) published one from the same inputs:
    a run where nothing changed reuses that model and its registry version, registers nothing
    new."""
    run_id, store, store_cfg, tracker = ctx.run_id, ctx.store, ctx.store_cfg, ctx.tracker
    if tracker is None:
        raise TypeError("publish needs the run's tracker (RunContext.tracker)")
    version, ready = ctx.version, ctx.ready
    name = plan.spec.registered_model
    objective = plan.spec.merge.objective
    config = {
        "format_version": 1,
        "kind": "merged_model",
        "mode": plan.spec.finetune.mode,
        "base_model": base.config,
        "input_dim": base.input_dim,
        "tasks": {
            t: {"num_classes": int(vector.meta.get("num_classes", 0))}
            for t, vector in vectors.items()
        },
        "candidate": {
            "method": best.method,
            "params": best.params,
            "coefficient": best.coefficient,
        },
    }
    meta = {
        "run_id": run_id,
        "base_digest": base.digest,
        "code_version": version,
        "candidate": {"id": best.id, **config["candidate"]},
        "task_vectors": {
            t: {
                "uri": vector.uri,
                "sha256": vector.sha256,
                "mode": vector.mode,
                "dataset_digest": vector.dataset_digest,
            }
            for t, vector in vectors.items()
        },
        "test": test_scores,
    }
    meta["inputs"] = digest_json(  # what the model is made of: equal inputs, equal model
        [config, {k: v for k, v in meta.items() if k not in ("run_id", "test")}]
    )
    previous = previous_model(store, previous_run, name, meta["inputs"])
    if previous is not None:
        stored = previous
    else:
        ready()
        job = PublishJob(store_cfg, base, vectors, best, name, run_id, config, meta)
        stored = get(submit_publish(job), "publish")

    tags = lineage_tags(plan, run_id, store, store_cfg, base, vectors, best, version)
    tags |= {"mergeline.model_uri": stored.uri, "mergeline.model_sha256": stored.sha256}
    score = test_scores[objective]
    tags["mergeline.test_objective"] = repr(float(score))  # exact: promotion compares it later
    result: dict[str, Any] = {
        "uri": stored.uri,
        "sha256": stored.sha256,
        "mlflow_run_id": None,
        "registered_model": name,
        "version": None,
        "aliases": [],
    }
    if not tracker.enabled:
        reason = f"not registered: {tracker.disabled}"
        return result | {"promotion": _promotion(False, reason, None, score)}

    champion = tracker.get_alias_version(name, "champion")
    champion_tags = champion.get("tags", {}) if champion else None
    promote, reason = decide_promotion(
        score,
        objective,
        tags["mergeline.tasks"],
        champion_tags,
        plan.spec.publish.min_improvement,
        {t: vector.dataset_digest for t, vector in vectors.items()},
    )
    previous_score = champion_score(champion_tags)
    promotion = _promotion(promote, reason, previous_score, score)
    no_score = previous_score is None
    tags |= {
        "mergeline.promotion.promoted": str(promote).lower(),
        "mergeline.promotion.reason": reason,
        "mergeline.promotion.score": repr(float(score)),
        "mergeline.promotion.champion_score": "" if no_score else repr(previous_score),
        "mergeline.promotion.champion_version": str(champion["version"]) if champion else "",
        "mergeline.promotion.min_improvement": repr(plan.spec.publish.min_improvement),
    }
    tags = {key: value for key, value in tags.items() if value}
    aliases = ["candidate", "champion"] if promote else ["candidate"]

    registered = tracker.find_run_version(name, run_id)
    if registered is not None:  # this run registered it before it was interrupted: reuse it
        return result | _registered_before(tracker, registered, aliases, promotion)
    if previous is not None:  # nothing changed: the previous run's version stands as it is
        earlier = tracker.find_run_version(name, previous.run_id)
        if earlier is not None:
            return result | _unchanged(earlier, previous.run_id, previous_score, score)
    flavor = kind_of(base.config).mlflow_task is not None and has_transformers_weights(
        store, stored.prefix
    )
    log_transformers = transformers_logger(store_cfg, stored.prefix) if flavor else None
    with logged_model_dir(store, store_cfg, stored) as model_dir:
        published = tracker.publish(
            str(model_dir),
            str(SERVING_TEXT_CODE if base.input_dim == 0 else SERVING_CODE),
            name,
            tags,
            aliases,
            {f"test_{k}": v for k, v in test_scores.items()},
            serving=(base.input_dim, {"task": plan.task_names[0]}),
            log_transformers=log_transformers,
            generation={"max_new_tokens": plan.spec.evaluation.max_new_tokens, "do_sample": False},
        )
    if published is None:  # tracking failed just now, under tracking.on_error: warn
        reason = f"not registered: {tracker.disabled}"
        return result | {"promotion": _promotion(False, reason, previous_score, score)}
    return result | {
        "mlflow_run_id": published.mlflow_run_id,
        "registered_model": published.registered_model,
        "version": published.version,
        "aliases": published.aliases,
        "promotion": promotion,
    }


def lineage_tags(
    plan: Plan,
    run_id: str,
    store: FsspecStore,
    store_cfg: dict[str, Any],
    base: BaseModelRef,
    vectors: dict[str, TaskVectorRef],
    best: Candidate,
    version: str,
) -> dict[str, str]:
    """The registry version's tags: enough to walk back to every input without the runs."""
    mode = plan.spec.finetune.mode
    tags = {
        "mergeline.run_id": run_id,
        "mergeline.spec_digest": plan.spec_digest,
        "mergeline.code_version": version,
        "mergeline.store": store.uri,
        "mergeline.store_endpoint_url": store_cfg.get("endpoint_url") or "",
        "mergeline.base_digest": base.digest,
        "mergeline.base_model_uri": base.uri,
        "mergeline.base_model_sha256": base.sha256,
        "mergeline.base_model": json.dumps(base.config, sort_keys=True),
        "mergeline.method": best.method,
        "mergeline.candidate": best.id,
        "mergeline.candidate.params": json.dumps(best.params, sort_keys=True),
        "mergeline.candidate.coefficient": json.dumps(best.coefficient, sort_keys=True),
        "mergeline.objective": plan.spec.merge.objective,
        "mergeline.tasks": ",".join(sorted(vectors)),
        "mergeline.mode": mode,
    }
    for task, vector in vectors.items():
        dataset = plan.task(task).dataset
        tags[f"mergeline.task.{task}.task_vector_uri"] = vector.uri
        tags[f"mergeline.task.{task}.task_vector_sha256"] = vector.sha256
        tags[f"mergeline.task.{task}.mode"] = vector.meta.get("mode", mode)
        tags[f"mergeline.task.{task}.dataset_digest"] = vector.dataset_digest
        tags[f"mergeline.task.{task}.dataset_source"] = json.dumps(dataset, sort_keys=True)
    return tags


def previous_model(
    store: FsspecStore, previous_run: str | None, name: str, inputs: str
) -> MergedModelRef | None:
    """The model run ``previous_run`` published, if it was made from ``inputs`` (the digest
    :func:`publish` writes in every merged model's meta) and is still in the store."""
    if previous_run is None:
        return None
    ref = find_artifact(store, model_prefix(name, previous_run))
    if ref is None or ref.meta.get("inputs") != inputs:
        return None
    return MergedModelRef.from_artifact(name, previous_run, ref)


def _unchanged(
    earlier: dict[str, Any], previous_run: str, champion: float | None, score: float
) -> dict[str, Any]:
    """The result of a run whose model equals its previous run's: that run's version."""
    reason = (
        f"not promoted: nothing changed since run {previous_run} "
        f"(version {earlier['version']}): the registry is left as it is"
    )
    return {
        "mlflow_run_id": earlier["run_id"],
        "registered_model": earlier["registered_model"],
        "version": earlier["version"],
        "aliases": earlier["aliases"],
        "reused_from": previous_run,
        "promotion": _promotion(False, reason, champion, score),
    }


def _registered_before(
    tracker: GuardedTracker,
    registered: dict[str, Any],
    aliases: list[str],
    promotion: dict[str, Any],
) -> dict[str, Any]:
    """The result of publishing a version again: no new version, the same aliases."""
    version = registered["version"]
    if "champion" in registered["aliases"] and "champion" not in aliases:
        aliases = [*aliases, "champion"]  # promoted before the interruption: it still is
        promotion = promotion | {"promoted": True, "reason": "promoted before the rerun"}
    for alias in aliases:
        tracker.set_alias(registered["registered_model"], alias, version)
    return {
        "mlflow_run_id": registered["run_id"],
        "registered_model": registered["registered_model"],
        "version": version,
        "aliases": aliases,
        "promotion": promotion,
    }


def _promotion(promoted: bool, reason: str, champion: float | None, score: float) -> dict[str, Any]:
    return {"promoted": promoted, "reason": reason, "champion_score": champion, "score": score}


def has_transformers_weights(store: FsspecStore, prefix: str) -> bool:
    """Whether the stored model's ``transformers/`` folder holds weights (its manifest says)."""
    manifest = read_manifest(store, prefix) or {"files": {}}
    inside = f"{TRANSFORMERS}/"
    return any(n.startswith(inside) and n.endswith(".safetensors") for n in manifest["files"])


class logged_model_dir:
    """The directory MLflow logs as the pyfunc model (removed after): the stored model's
    pointer and config (:mod:`storage.stored_model`), so the driver reads no weights and MLflow
    copies none. (The transformers flavor, which loads the whole model, is logged by a Ray
    task: :func:`pipelines.run.dag.transformers_logger`.)"""

    def __init__(
        self, store: FsspecStore, store_cfg: dict[str, Any], stored: MergedModelRef
    ) -> None:
        self.store, self.store_cfg, self.stored = store, store_cfg, stored
        self._temporary: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        self._temporary = tempfile.TemporaryDirectory(prefix="mergeline-model-")
        model = Path(self._temporary.name) / "model"
        model.mkdir()
        endpoint = self.store_cfg.get("endpoint_url")
        prefix, sha256 = self.stored.prefix, self.stored.sha256
        for name, data in reference_files(self.store, endpoint, prefix, sha256).items():
            (model / name).write_bytes(data)
        return model

    def __exit__(self, *exc: object) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()

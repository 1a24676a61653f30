"""Stage 7 (driver side): merged model to the store, MLflow logged model, registry, aliases."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray

from pipelines.plan import Candidate, Plan
from pipelines.raysession import get
from pipelines.selection import decide_promotion
from pipelines.stages.publish import merge_and_store_job
from storage.objectstore import ObjectStore
from storage.tracking import MlflowTracker

SERVING_CODE = Path(__file__).with_name("serving.py")


def publish(
    plan: Plan,
    run_id: str,
    store: ObjectStore,
    store_cfg: dict[str, Any],
    tracker: MlflowTracker,
    base_key: str,
    base_meta: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
    best: Candidate,
    test_scores: dict[str, float],
    version: str,
) -> dict[str, Any]:
    name = plan.spec.registered_model
    objective = plan.spec.merge.objective
    config = {
        "format_version": 1,
        "kind": "merged_model",
        "mode": plan.finetune["mode"],
        "base_model": base_meta["config"],
        "input_dim": base_meta["input_dim"],
        "tasks": {
            t: {"num_classes": int(info["meta"].get("num_classes", 0))} for t, info in tasks.items()
        },
        "candidate": {
            "method": best.method,
            "params": best.params,
            "coefficient": best.coefficient,
        },
    }
    meta = {
        "run_id": run_id,
        "base_digest": base_meta["digest"],
        "code_version": version,
        "task_vectors": {
            t: {"uri": info["ref"].uri, "sha256": info["ref"].sha256} for t, info in tasks.items()
        },
        "test": test_scores,
    }
    job = ray.remote(merge_and_store_job).options(num_cpus=1)
    stored = get(
        job.remote(
            store_cfg,
            base_key,
            base_meta,
            {t: i["key"] for t, i in tasks.items()},
            best,
            name,
            run_id,
            config,
            meta,
        ),
        "publish",
    )

    tags = {
        "mergeline.run_id": run_id,
        "mergeline.model_uri": stored["uri"],
        "mergeline.model_sha256": stored["sha256"],
        "mergeline.base_digest": base_meta["digest"],
        "mergeline.code_version": version,
        "mergeline.method": best.method,
        "mergeline.candidate": best.id,
        "mergeline.objective": objective,
        "mergeline.test_objective": f"{test_scores[objective]:.6f}",
        "mergeline.tasks": ",".join(sorted(tasks)),
        "mergeline.mode": plan.finetune["mode"],
    }
    for task, info in tasks.items():
        tags[f"mergeline.task.{task}.task_vector_uri"] = info["ref"].uri
        tags[f"mergeline.task.{task}.task_vector_sha256"] = info["ref"].sha256
        tags[f"mergeline.task.{task}.dataset_digest"] = info["meta"]["dataset_digest"]

    champion = tracker.get_alias_version(name, "champion")
    promote, reason = decide_promotion(
        test_scores[objective],
        objective,
        tags["mergeline.tasks"],
        champion.get("tags", {}) if champion else None,
    )
    aliases = ["candidate", "champion"] if promote else ["candidate"]
    tags["mergeline.promotion"] = reason

    with _local_copy(store, stored["prefix"]) as model_dir:
        published = tracker.publish(
            str(model_dir),
            str(SERVING_CODE),
            name,
            tags,
            aliases,
            {f"test_{k}": v for k, v in test_scores.items()},
            serving=(base_meta["input_dim"], {"task": plan.task_names[0]}),
        )
    return {
        "uri": stored["uri"],
        "sha256": stored["sha256"],
        "mlflow_run_id": published.mlflow_run_id,
        "registered_model": published.registered_model,
        "version": published.version,
        "aliases": published.aliases,
        "promotion": reason,
    }


class _local_copy:
    """The model's files as a local directory (the store's own path when it is local)."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store, self.prefix, self._temporary = store, prefix, None

    def __enter__(self) -> Path:
        local = self.store.local_path(self.prefix)
        if local is not None:
            return Path(local)
        self._temporary = tempfile.TemporaryDirectory(prefix="mergeline-model-")
        for name in self.store.list(self.prefix):
            (Path(self._temporary.name) / name).write_bytes(self.store.get(f"{self.prefix}/{name}"))
        return Path(self._temporary.name)

    def __exit__(self, *exc: object) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()

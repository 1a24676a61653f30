"""The DAG: the one module that turns stage functions into Ray tasks (and scorers into actors).

Each ``submit_*`` takes a stage's typed job, asks Ray for what :mod:`pipelines.run.scheduling`
says it needs, and returns the task's ``ObjectRef`` (read it with
:func:`pipelines.run.raysession.get`). The stage functions stay plain functions, callable
without Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import ray
from ray import ObjectRef

from pipelines.run.raysession import get
from pipelines.run.scheduling import actor_options, finetune_options
from pipelines.spec.plan import Plan
from pipelines.spec.refs import BaseModelRef
from pipelines.spec.search import resolve_search
from pipelines.stages.base import pretrain_base_job
from pipelines.stages.finetune import run_finetune_job
from pipelines.stages.jobs import FinetuneJob, PretrainJob, PublishJob, StatisticsJob
from pipelines.stages.publish import merge_and_store_job
from pipelines.stages.search import CandidateScorer, Evaluator, ForwardEvaluator, ScoringInputs
from pipelines.stages.statistics import statistics_job
from pipelines.stages.tangent_search import TangentEvaluator, disentanglement_job
from storage.artifacts import verify_artifact
from storage.mlflow_model import log_stored_transformers
from storage.objectstore import open_store_from
from storage.tracking import TransformersLogger

# Made remote once: Ray exports each function to the cluster once, not once per submission.
_pretrain = ray.remote(pretrain_base_job)
_finetune = ray.remote(run_finetune_job)
_statistics = ray.remote(statistics_job)
_publish = ray.remote(merge_and_store_job)
_disentanglement = ray.remote(disentanglement_job)
_log_transformers = ray.remote(log_stored_transformers)


def transformers_logger(store_cfg: dict[str, Any], prefix: str) -> TransformersLogger:
    """Stage 7's MLflow transformers flavor, logged by a Ray task: the flavor loads the whole
    merged model (a transformers pipeline) and copies its weights, which the driver must not."""

    def log(
        tracking_uri: str,
        run_id: str,
        registered_model: str,
        tags: dict[str, str],
        model_config: dict[str, Any] | None,
    ) -> Any:
        task = _log_transformers.options(num_cpus=1, max_retries=0).remote(
            store_cfg, prefix, tracking_uri, run_id, registered_model, tags, model_config
        )
        return get(task, "publish: MLflow transformers flavor")

    return log


def verify_job(store_cfg: dict[str, Any], prefix: str) -> str | None:
    """None if the artifact at ``prefix`` is intact, else what failed its checksum."""
    return verify_artifact(open_store_from(store_cfg), prefix)


_verify = ray.remote(verify_job)


def submit_pretrain(job: PretrainJob) -> ObjectRef:
    """Stage 1b: build (and pretrain) the base model."""
    return _pretrain.options(num_cpus=1, max_retries=2).remote(job)


def finetune_submitter(plan: Plan) -> Callable[[FinetuneJob], ObjectRef]:
    """Stages 2-4: a function that submits one task's :class:`FinetuneJob`. Its options are
    read now, so an impossible request (ZeRO-3) fails before any work, cached or not."""
    options = finetune_options(plan)

    def submit_finetune(job: FinetuneJob) -> ObjectRef:
        return _finetune.options(**options).remote(job)

    return submit_finetune


def submit_statistics(plan: Plan, job: StatisticsJob) -> ObjectRef:
    """Stage 4b: one task vector's data statistics."""
    return _statistics.options(**actor_options(plan), max_retries=2).remote(job)


def submit_verify(store_cfg: dict[str, Any], prefix: str) -> ObjectRef:
    """A cached artifact's checksums, read where the store is (see :mod:`pipelines.run.cache`)."""
    return _verify.options(num_cpus=0.5, max_retries=2).remote(store_cfg, prefix)


def submit_publish(job: PublishJob) -> ObjectRef:
    """Stage 7 (worker side): build the chosen merge and write it to the store."""
    return _publish.options(num_cpus=1).remote(job)


def submit_disentanglement(
    store_cfg: dict[str, Any],
    base: BaseModelRef,
    tasks: dict[str, dict[str, Any]],
    evaluation: dict[str, Any],
    mode: str,
    alphas: list[float],
    split: str,
) -> ObjectRef:
    """``mergeline diagnose disentanglement``: ξ(α1, α2) of a pair of task vectors
    (``tasks``: each task's task-vector key and dataset section)."""
    return _disentanglement.options(num_cpus=1).remote(
        store_cfg, base.key, base.meta, tasks, evaluation, mode, alphas, split
    )


def start_scorers(
    plan: Plan,
    store_cfg: dict[str, Any],
    base_key: str,
    base_meta: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
) -> list[Any]:
    """The scorer actors: as many as the spec asks for, the cluster's CPUs and GPUs and the
    candidates allow, each holding the evaluator the search needs, on its device."""
    specs = {
        name: {"key": info["key"], "dataset": plan.tasks[plan.task_names.index(name)].dataset}
        for name, info in tasks.items()
    }
    # Never more actors than the cluster can hold at once (merge.resources each): the extra
    # ones would never start, and the candidates handed to them would wait forever.
    resources, cluster = plan.spec.merge.resources, ray.cluster_resources()
    fits = int(cluster.get("CPU", 1) // resources.num_cpus)
    if resources.num_gpus > 0:
        fits = min(fits, int(cluster.get("GPU", 0) // resources.num_gpus))
    count = max(1, min(plan.spec.merge.num_actors, len(plan.candidates), fits))
    settings = resolve_search(plan.spec)
    evaluator: Callable[[ScoringInputs], Evaluator] = ForwardEvaluator
    if settings.tangent:
        count = 1 if settings.all_fast else count
        evaluator = partial(TangentEvaluator, mode=plan.finetune["mode"])
    actor = ray.remote(**actor_options(plan))(CandidateScorer)
    args = (store_cfg, base_key, base_meta, specs, plan.evaluation, evaluator)
    args += (max(1, int(resources.num_cpus)), resources.device)
    return [actor.remote(*args) for _ in range(count)]

"""Stage 4b: the data statistics data-aware merge methods read (regmean: Gram, fisher: Fisher).

One job per task computes every statistic its task vector lacks, on the task's training rows at
θ0 + τ_t (``workers.finetune.statistics``), and stores each beside the task vector, keyed by
the task vector's key, the statistic and the row count, and tied to the task vector's sha256.
Cached task vectors get theirs without a new fine-tune; unchanged ones reuse stored ones.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipelines.stages.base import load_task_data, open_base, open_task_vector
from pipelines.stages.jobs import Need, StatisticsJob
from storage.objectstore import open_store_from
from storage.shards import FileTensors, SafetensorsReader
from storage.taskvectors import find_statistics, statistics_file, write_statistics
from workers.adapters import LoraDelta
from workers.finetune.statistics import diagonal_fisher, gram_matrices
from workers.search.evaluate import at_state


def statistics_job(job: StatisticsJob) -> dict[str, float]:
    """Compute and store the ``needs`` of one task vector that are not stored yet; returns
    seconds per statistic computed."""
    torch.set_num_threads(1)
    store = open_store_from(job.store)
    vector = job.vector
    missing = [
        (kind, rows)
        for kind, rows in job.needs
        if find_statistics(store, vector.key, kind, rows, vector.sha256) is None
    ]
    if not missing:
        return {}
    opened = open_base(job.store, job.base.key, job.base.meta)
    backbone, theta0, kind_of_task = opened.backbone, opened.theta0, opened.kind
    tau, head = open_task_vector(job.store, vector.key, theta0)
    changed = sorted(tau.factors) if isinstance(tau, LoraDelta) else sorted(theta0)
    theta = {name: theta0[name] + tau[name] for name in theta0}
    changed = [name for name in changed if bool((theta[name] != theta0[name]).any())]
    data = load_task_data(opened, job.dataset.source, job.evaluation, job.dataset.what)
    model = kind_of_task.trainable(backbone, head)
    timings = {}
    for kind, rows in missing:
        started = time.perf_counter()
        if kind == "gram":
            stats = gram_matrices(
                backbone, at_state(backbone, theta), changed, data.x_train, data.y_train, rows
            )
        else:
            stats = diagonal_fisher(
                model,
                backbone,
                theta,
                changed,
                kind_of_task.loss,
                data.x_train,
                data.y_train,
                rows,
            )
        seconds = time.perf_counter() - started
        meta = {
            "task": vector.task,
            "task_vector_sha256": vector.sha256,
            "rows_used": min(rows, len(data.x_train)),
            "tensors": len(stats),
            "seconds": round(seconds, 3),
        }
        write_statistics(store, vector.key, kind, rows, stats, meta)
        timings[f"{kind}-n{rows}"] = seconds
    return timings


def open_statistics(
    store_cfg: dict[str, Any], keys: dict[str, str], kind: str, rows: int
) -> dict[str, FileTensors]:
    """Each task's stored statistics ``{task: {name: tensor}}`` (``keys``: task -> its task
    vector's key), verified against their manifests; each tensor is read from the node-local
    file when it is looked up, so a streamed merge holds one at a time."""
    store = open_store_from(store_cfg)
    return {
        task: FileTensors(SafetensorsReader(statistics_file(store, key, kind, rows)))
        for task, key in keys.items()
    }


def statistics_params(
    store_cfg: dict[str, Any],
    keys: dict[str, str],
    method: str,
    params: dict[str, Any],
    cache: dict[Need, Any] | None = None,
) -> dict[str, Any]:
    """``{"statistics": ...}`` for a data-aware method's merge (read from the store, or from
    ``cache``, which keeps what was read per statistic and row count), else {}."""
    from workers.merge import get_method

    registered = get_method(method)
    if registered.statistics is None:
        return {}
    need = (registered.statistics, registered.validate_params(params).n)  # type: ignore[attr-defined]
    cache = {} if cache is None else cache
    if need not in cache:
        cache[need] = open_statistics(store_cfg, keys, *need)
    return {"statistics": cache[need]}

"""Stage 7 (worker side): build the chosen merge and write it to the store."""

from __future__ import annotations

from typing import Any

from pipelines.plan import Candidate
from pipelines.stages.base import load_base
from pipelines.stages.publish_tall import write_tall_model
from storage.objectstore import open_store_from
from storage.taskvectors import read_task_vector, write_merged_model
from workers.finetune import pack_linearized
from workers.merge import merge


def merge_and_store_job(
    store_cfg: dict[str, Any],
    base_key: str,
    base_meta: dict[str, Any],
    task_keys: dict[str, str],
    candidate: Candidate,
    name: str,
    run_id: str,
    config: dict[str, Any],
    meta: dict[str, Any],
) -> dict[str, Any]:
    store = open_store_from(store_cfg)
    base = load_base(store_cfg, base_key)
    vectors, heads = {}, {}
    for task, key in task_keys.items():
        vectors[task], heads[task] = read_task_vector(store, key)
    if candidate.method == "tall_masks":  # a model per task: θ0 + τ_MTL + packed masks
        ref = write_tall_model(store, name, run_id, base, vectors, heads, candidate, config, meta)
        return {"uri": ref.uri, "prefix": ref.prefix, "sha256": ref.sha256}
    merged = merge(candidate.method, base, vectors, candidate.coefficient, **candidate.params)
    if config.get("mode") == "linear":  # served as f(x; θ0) + J f(x; θ0)·τ: keep θ0 and τ
        merged = pack_linearized(base, merged)
    ref = write_merged_model(store, name, run_id, merged, heads, config, meta)
    return {"uri": ref.uri, "prefix": ref.prefix, "sha256": ref.sha256}

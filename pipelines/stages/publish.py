"""Stage 7 (worker side): build the chosen merge and write it to the store."""

from __future__ import annotations

from typing import Any

from pipelines.plan import Candidate
from pipelines.stages.base import load_base
from storage.objectstore import open_store
from storage.taskvectors import read_task_vector, write_merged_model
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
    store = open_store(store_cfg["uri"], store_cfg.get("endpoint_url"))
    base = load_base(store_cfg, base_key)
    vectors, heads = {}, {}
    for task, key in task_keys.items():
        vectors[task], heads[task] = read_task_vector(store, key)
    merged = merge(candidate.method, base, vectors, candidate.coefficient, **candidate.params)
    ref = write_merged_model(store, name, run_id, merged, heads, config, meta)
    return {"uri": ref.uri, "prefix": ref.prefix, "sha256": ref.sha256}

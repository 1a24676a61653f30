"""Stage 7 (worker side): build the chosen merge and write it to the store.

A merge of a Hugging Face base also gets a ``transformers/`` folder: the base's config and
tokenizer files, and (for a standard-mode single merged model) the merged encoder weights
under the encoder's own names, so ``transformers.AutoModel.from_pretrained`` loads it; the
task heads are beside it in ``heads.safetensors`` (``<task>.weight``, ``<task>.bias``) with
``heads.json`` (pooling, max_length, classes). A linear-mode merge is the linearized model
f(x; θ0) + J f(x; θ0)·τ, which no plain transformers model computes, and a retrieval method
(tall_masks) is one model per task: those two keep the config and tokenizer there but no
weights, and are served through the MLflow model.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.spec.plan import Candidate, is_retrieval
from pipelines.spec.refs import BaseModelRef, MergedModelRef
from pipelines.stages.base import base_files, kind_of, load_base, open_task_vector
from pipelines.stages.jobs import PublishJob
from pipelines.stages.publish_tall import write_tall_model
from pipelines.stages.statistics import statistics_params
from storage.objectstore import open_store_from
from storage.taskvectors import write_merged_model
from workers.adapters import LoraDelta, concat_factors
from workers.adapters.peft_export import peft_adapter_files
from workers.finetune import pack_linearized
from workers.merge.engine import merge_state
from workers.search.fastpath import linear_weights

Tensors = dict[str, torch.Tensor]
PEFT = "peft"  # the folder of a published adapter merge that PeftModel.from_pretrained loads


def merge_and_store_job(job: PublishJob) -> MergedModelRef:
    store = open_store_from(job.store)
    store_cfg, base_ref, candidate, config = job.store, job.base, job.candidate, job.config
    base = load_base(store_cfg, base_ref.key)
    task_keys = {task: vector.key for task, vector in job.vectors.items()}
    vectors, heads = {}, {}
    for task, key in task_keys.items():
        vectors[task], heads[task] = open_task_vector(store_cfg, key, base)
    adapters = all(isinstance(v, LoraDelta) for v in vectors.values())
    hf_base = base_ref.config["source"] == "hf"
    if is_retrieval(candidate.method):  # a model per task: θ0 + τ_MTL + packed masks
        extra = export_files(store_cfg, base_ref, None, heads) if hf_base else None
        ref = write_tall_model(
            store, job.name, job.run_id, base, vectors, heads, candidate, config, job.meta, extra
        )
        return MergedModelRef.from_artifact(job.name, job.run_id, ref)
    statistics = statistics_params(store_cfg, task_keys, candidate.method, candidate.params)
    merged = merge_state(
        candidate.method, base, vectors, candidate.coefficient, **candidate.params, **statistics
    )
    extra = None
    if hf_base:
        linear = config.get("mode") == "linear"
        # A linear-mode merge is f(x; θ0) + J f(x; θ0)·τ; a kind that exports it anyway writes
        # the non-linear θ0 + Σ α_t τ_t, labelled as such in the manifest.
        plain = merged if not linear or kind_of(base_ref.config).export_nonlinear else None
        extra = export_files(store_cfg, base_ref, plain, heads)
        config = config | {
            "transformers_weights": (
                None if plain is None else "nonlinear_theta0_plus_tau" if linear else "merged"
            )
        }
        if adapters:
            peft, config["peft_adapter"] = adapter_files(base_ref, vectors, candidate, linear)
            extra |= peft
    elif adapters:
        reason = "a builtin model has no Hugging Face form for PEFT to adapt: dense model only"
        config = config | {"peft_adapter": {"published": False, "reason": reason}}
    if config.get("mode") == "linear":  # served as f(x; θ0) + J f(x; θ0)·τ: keep θ0 and τ
        merged = pack_linearized(base, merged)
    ref = write_merged_model(store, job.name, job.run_id, merged, heads, config, job.meta, extra)
    return MergedModelRef.from_artifact(job.name, job.run_id, ref)


def adapter_files(
    base: BaseModelRef, vectors: dict[str, LoraDelta], candidate: Candidate, linear: bool
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A linear merge of adapters as one PEFT adapter of rank Σ r_t under ``peft/`` (exact in
    factor space); any other method publishes the dense model only. Returns the files and what
    the manifest says of them."""
    tasks = sorted(vectors)
    alphas = linear_weights(candidate.method, candidate.params, candidate.coefficient, tasks)
    if alphas is None:
        reason = f"{candidate.method} is not linear in the task vectors: dense model only"
        return {}, {"published": False, "reason": reason}
    merged = concat_factors(
        {t: vectors[t].factors for t in tasks}, dict(zip(tasks, alphas, strict=True))
    )
    prefix = kind_of(base.config).hf_prefix
    files = {f"{PEFT}/{n}": data for n, data in peft_adapter_files(merged, prefix).items()}
    ranks = sorted({f.rank for f in merged.values()})
    return files, {
        "published": True,
        "folder": PEFT,
        "rank": ranks[-1],
        "computes": "nonlinear_theta0_plus_tau" if linear else "merged",
    }


def export_files(
    store_cfg: dict[str, Any],
    base: BaseModelRef,
    merged: Tensors | None,
    heads: dict[str, Tensors],
) -> dict[str, bytes]:
    """The kind's published files (see the module docstring) from the base's HF files."""
    directory = base_files(store_cfg, base.key, base.meta)
    return kind_of(base.config).export(directory, merged, heads, base.config)

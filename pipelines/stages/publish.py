"""Stage 7 (worker side): build the chosen merge and write it to the store.

The merge streams (:mod:`pipelines.stages.streamed_merge`): θ0 and the task vectors are read
tensor by tensor from their node-local files, each merged tensor is written to a scratch
``model.safetensors`` as it is computed, the exports are copied from that file tensor by
tensor, and the files are then uploaded. No state dict of the model is ever held (tall_masks,
which compresses every task vector at once, is the exception: :func:`_store_tall`).

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

from pathlib import Path
from typing import Any

import torch

from pipelines.spec.plan import Candidate, is_retrieval
from pipelines.spec.refs import BaseModelRef, MergedModelRef
from pipelines.stages.base import base_files, kind_of, load_base, open_task_source, open_task_vector
from pipelines.stages.jobs import PublishJob
from pipelines.stages.publish_tall import write_tall_model
from pipelines.stages.statistics import statistics_params
from pipelines.stages.streamed_merge import StreamedMerge, start_merge
from storage.modeldir import merged_tensors
from storage.objectstore import open_store_from
from storage.shards import SINGLE_NAME, SafetensorsReader, ShardedWriter, TensorView
from storage.staged import ArtifactFile, ScratchDirectory
from storage.taskvectors import base_model_file, write_merged_model
from workers.adapters import LoraDelta, concat_factors
from workers.adapters.peft_export import peft_adapter_files
from workers.finetune.linearized import BASE_PREFIX, DELTA_PREFIX
from workers.kinds.registry import MergedWeights
from workers.search.fastpath import linear_weights

Tensors = dict[str, torch.Tensor]
PEFT = "peft"  # the folder of a published adapter merge that PeftModel.from_pretrained loads


def merge_and_store_job(job: PublishJob) -> MergedModelRef:
    """Merge tensor by tensor from θ0's and the task vectors' node-local files into a scratch
    ``model.safetensors``, export from that file, then upload every file to the store."""
    store = open_store_from(job.store)
    store_cfg, base_ref, candidate, config = job.store, job.base, job.candidate, job.config
    task_keys = {task: vector.key for task, vector in job.vectors.items()}
    hf_base = base_ref.config["source"] == "hf"
    if is_retrieval(candidate.method):  # a model per task: θ0 + τ_MTL + packed masks
        return _store_tall(job, task_keys, hf_base)
    base = SafetensorsReader(base_model_file(store, base_ref.key))
    sources: dict[str, Any] = {}
    heads: dict[str, Tensors] = {}
    weights: MergedWeights | None = None
    try:
        for task, key in task_keys.items():
            sources[task], heads[task] = open_task_source(store_cfg, key, base.tensors)
        adapters = all(isinstance(v, LoraDelta) for v in sources.values())
        statistics = statistics_params(store_cfg, task_keys, candidate.method, candidate.params)
        merge = start_merge(
            candidate.method,
            base,
            sources,
            candidate.coefficient,
            candidate.params,
            statistics.get("statistics"),
        )
        linear = config.get("mode") == "linear"
        # A linear-mode merge is f(x; θ0) + J f(x; θ0)·τ; a kind that exports it anyway writes
        # the non-linear θ0 + Σ α_t τ_t, labelled as such in the manifest.
        plain = hf_base and (not linear or kind_of(base_ref.config).export_nonlinear)
        scratch = ScratchDirectory("mergeline-publish-")  # lives as long as its files are named
        model, weights = write_model_file(scratch.path, merge, base, heads, linear, plain)
        extra: dict[str, ArtifactFile] = {}
        if hf_base:
            extra = export_files(store_cfg, base_ref, weights, heads)
            config = config | {
                "transformers_weights": (
                    None if not plain else "nonlinear_theta0_plus_tau" if linear else "merged"
                )
            }
            if adapters:
                peft, config["peft_adapter"] = adapter_files(base_ref, sources, candidate, linear)
                extra |= peft
        elif adapters:
            reason = "a builtin model has no Hugging Face form for PEFT to adapt: dense model only"
            config = config | {"peft_adapter": {"published": False, "reason": reason}}
    finally:
        for reader in (weights, base, *sources.values()):
            if hasattr(reader, "close"):  # file readers (an adapter's factors are in memory)
                reader.close()
    model_file = scratch.file(model.relative_to(scratch.path))
    ref = write_merged_model(store, job.name, job.run_id, model_file, config, job.meta, extra)
    return MergedModelRef.from_artifact(job.name, job.run_id, ref)


def write_model_file(
    directory: Path,
    merge: StreamedMerge,
    base: SafetensorsReader,
    heads: dict[str, Tensors],
    linear: bool,
    plain: bool,
) -> tuple[Path, MergedWeights | None]:
    """Stream ``merge`` into ``directory/model/model.safetensors``: the merged backbone, or in
    linear mode (served as f(x; θ0) + J f(x; θ0)·τ) the pairs ``base.<name>`` = θ0 and
    ``delta.<name>`` = merged − θ0, then the heads as ``heads.<task>.<name>``.

    Returns the file and a reader of the merged backbone on disk for the kind's export with
    ``plain``: the file itself, or in linear mode a second file ``plain/model.safetensors``
    written from the same stream (None without ``plain``). Nothing but the tensor being
    written is held."""
    specs = merge.specs()
    layout = (
        [(prefix + n, d, s) for n, d, s in specs for prefix in (BASE_PREFIX, DELTA_PREFIX)]
        if linear
        else list(specs)
    )
    head_tensors = merged_tensors({}, heads)
    layout += [(name, t.dtype, tuple(t.shape)) for name, t in head_tensors.items()]
    writers = [ShardedWriter(directory / "model", layout, single_file=True)]
    if linear and plain:
        writers.append(ShardedWriter(directory / "plain", specs, single_file=True))
    model = writers[0]
    try:
        for name, tensor in merge.tensors():
            if linear:
                theta0 = base.read(name)
                model.write(BASE_PREFIX + name, theta0)
                model.write(DELTA_PREFIX + name, tensor - theta0)
                del theta0
            else:
                model.write(name, tensor)
            for other in writers[1:]:
                other.write(name, tensor)
        for name, tensor in head_tensors.items():
            model.write(name, tensor)
        written = [writer.finish() / SINGLE_NAME for writer in writers]
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    if not plain:
        return written[0], None
    reader = SafetensorsReader(written[-1])
    return written[0], reader if linear else TensorView(reader, {n: n for n, _, _ in specs})


def _store_tall(job: PublishJob, task_keys: dict[str, str], hf_base: bool) -> MergedModelRef:
    """tall_masks: compressed in memory from θ0 and every task vector read whole (TALL-mask
    compression needs τ_MTL and every τ_t at once)."""
    store, store_cfg, base_ref = open_store_from(job.store), job.store, job.base
    base = load_base(store_cfg, base_ref.key)
    vectors, heads = {}, {}
    for task, key in task_keys.items():
        vectors[task], heads[task] = open_task_vector(store_cfg, key, base)
    extra = export_files(store_cfg, base_ref, None, heads) if hf_base else None
    ref = write_tall_model(
        store,
        job.name,
        job.run_id,
        base,
        vectors,
        heads,
        job.candidate,
        job.config,
        job.meta,
        extra,
    )
    return MergedModelRef.from_artifact(job.name, job.run_id, ref)


def adapter_files(
    base: BaseModelRef, vectors: dict[str, LoraDelta], candidate: Candidate, linear: bool
) -> tuple[dict[str, ArtifactFile], dict[str, Any]]:
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
    merged: MergedWeights | None,
    heads: dict[str, Tensors],
) -> dict[str, ArtifactFile]:
    """The kind's published files (see the module docstring) from the base's HF files."""
    directory = base_files(store_cfg, base.key, base.meta)
    return kind_of(base.config).export(directory, merged, heads, base.config)

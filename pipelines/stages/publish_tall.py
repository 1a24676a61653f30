"""Stage 7 for tall_masks: publish the compressed task vectors, one model per task.

A tall_masks merge is compression, not one merged model (MERGING.md): the published directory
holds θ0's backbone and the heads in ``model.safetensors`` (the usual layout), ``config.json``,
and τ_MTL plus each task's bit-packed mask with its λ_t (``storage.tall``). The serving model
rebuilds θ0 + m_t ∘ τ_MTL for the task it is asked about.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from pipelines.spec.plan import Candidate
from storage.artifacts import ArtifactRef
from storage.modeldir import merged_tensors
from storage.objectstore import ObjectStore
from storage.staged import ArtifactFile, TensorFile
from storage.tall import write_tall_artifact
from storage.taskvectors import model_prefix
from workers.merge.compression import compress_tall, compression_ratio

Tensors = dict[str, torch.Tensor]


def write_tall_model(
    store: ObjectStore,
    name: str,
    run_id: str,
    base: Tensors,
    vectors: dict[str, Tensors],
    heads: dict[str, Tensors],
    candidate: Candidate,
    config: dict[str, Any],
    meta: dict[str, Any],
    extra_files: dict[str, ArtifactFile] | None = None,
) -> ArtifactRef:
    """Compress with the candidate's λ_t and write the model; meta records the ratio."""
    params = dict(candidate.params)
    compressed = compress_tall(
        base, vectors, params.get("lam", 0.4), use_ties=bool(params.get("use_ties", False))
    )
    model_files = {
        "model.safetensors": TensorFile(merged_tensors(base, heads)),
        "config.json": json.dumps(config, indent=1, sort_keys=True).encode(),
        **(extra_files or {}),
    }
    info = {
        "lams": compressed.lams,
        "use_ties": compressed.use_ties,
        "compression": compression_ratio(compressed, vectors),
    }
    prefix = model_prefix(name, run_id)
    meta = meta | {"kind": "merged_model"}
    return write_tall_artifact(
        store, prefix, compressed.multi_task, compressed.masks, info, meta, model_files
    )

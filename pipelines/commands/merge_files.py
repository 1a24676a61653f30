"""Merge safetensors files into a sharded model directory with the streaming engine.

θ0 and each task vector are read one tensor at a time and each merged tensor is written as
soon as it is computed (:mod:`pipelines.stages.streamed_merge`, shared with the publish stage).
An adapter task vector (LoRA factors) is a ``streamed_merge.AdapterReader``: each ΔW = s·B·A
is computed when the engine reads that tensor.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipelines.stages.streamed_merge import TaskReader, start_merge
from storage.shards import DEFAULT_SHARD_BYTES, SafetensorsReader, ShardedWriter, TensorView
from workers.adapters.factors import Factor
from workers.merge.backbone import Coefficient
from workers.models.huggingface import BACKBONE_PREFIX

#: Files of a Hugging Face model directory copied beside the merged shards.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


def merge_files(
    base: SafetensorsReader | TensorView,
    tasks: Mapping[str, TaskReader],
    out: str | Path,
    method: str,
    coefficient: Coefficient = 1.0,
    params: Mapping[str, Any] | None = None,
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    side_files: Mapping[str, bytes | Path] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    statistics: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Merge into ``out`` (sharded safetensors + index); returns what was done and how fast.

    ``extra_tensors`` (e.g. the task heads) are written after the merged backbone, unmerged;
    ``side_files`` (config.json, tokenizer files, provenance) are copied in before the
    directory becomes visible. ``statistics``: what a data-aware method reads, per task.
    """
    started = time.perf_counter()
    merge = start_merge(method, base, tasks, coefficient, params, statistics)
    extra = dict(extra_tensors or {})
    specs = merge.specs() + [(name, t.dtype, tuple(t.shape)) for name, t in extra.items()]
    writer = ShardedWriter(out, specs, max_shard_bytes=max_shard_bytes)
    try:
        for name, tensor in merge.tensors():
            writer.write(name, tensor)
        for name, tensor in extra.items():
            writer.write(name, tensor)
        for name, content in (side_files or {}).items():
            target = writer.staging / name
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
        directory = writer.finish()
    except BaseException:
        writer.abort()
        raise
    # the dense task vectors merged (an adapter counts as the ΔW it stands for)
    read_bytes = sum(i.nbytes for reader in tasks.values() for i in reader.tensors.values())
    return {
        "out": str(directory),
        "tensors": len(specs),
        "shards": len(set(writer.weight_map.values())),
        "task_vector_bytes": read_bytes,
        "global_thresholds": merge.thresholds,
        "global_majority": merge.majority,
        "seconds": time.perf_counter() - started,
    }


def hf_side_files(directory: Path) -> dict[str, Path]:
    """config.json and tokenizer files of a Hugging Face model directory, where present."""
    return {name: directory / name for name in HF_SIDE_FILES if (directory / name).is_file()}


def onto_files(reader: SafetensorsReader) -> TensorView:
    """A pipeline task vector of a Hugging Face base under the model files' tensor names."""
    return TensorView(reader, {name.removeprefix(BACKBONE_PREFIX): name for name in reader.names()})


def names_onto_files(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors named as the pipeline names a Hugging Face base's, under the files' names."""
    return {name.removeprefix(BACKBONE_PREFIX): value for name, value in tensors.items()}


def factors_onto_files(factors: Mapping[str, Factor]) -> dict[str, Factor]:
    """A pipeline adapter of a Hugging Face base under the model files' tensor names."""
    return {name.removeprefix(BACKBONE_PREFIX): factor for name, factor in factors.items()}


def split_unmerged(
    base: SafetensorsReader, task_readers: Iterable[SafetensorsReader | TensorView]
) -> tuple[TensorView, dict[str, torch.Tensor]]:
    """(the base's tensors some task vector has, the others read as they are).

    A model file may hold tensors that are no trained parameter (``position_ids`` buffers):
    no task vector has them, and the merged model keeps them unchanged. With no dense task
    vector to name them (adapters only), every floating-point tensor is merged.
    """
    trained = {name for reader in task_readers for name in reader.names()}
    if not trained:
        trained = {name for name, info in base.tensors.items() if info.dtype.is_floating_point}
    merged = TensorView(base, {name: name for name in base.names() if name in trained})
    kept = {name: base.read(name) for name in base.names() if name not in trained}
    return merged, kept


def provenance(info: Mapping[str, Any]) -> bytes:
    """``merge.json``: what produced the merged model (method, params, inputs, code version)."""
    return json.dumps(dict(info), indent=1, sort_keys=True, default=str).encode()

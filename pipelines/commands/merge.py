"""``mergeline merge``: merge task vectors already in the store, without running a pipeline.

    mergeline merge --base base-models/<key> --task digits-perm1 --task digits-perm2 \\
        --method ties --param density=0.2 --param scope=per_tensor --coefficient 1.0 --out merged/

``--base`` is a base-model artifact of the store (``base-models/<key>`` or its full URI) or a
directory of safetensors (a Hugging Face model). ``--task`` is a task-vector key or URI
(``task-vectors/<key>``) or a task name, resolved through the manifests' ``meta.task``. Every
file is checked against its manifest's sha256 and every task vector must have been built from
this base (``meta.base_digest``). The output is sharded safetensors with a Hugging Face index;
beside it go the base's config.json and tokenizer files (an HF base) or the merged-model
config.json and the task heads (a store base), and ``merge.json`` (what produced it).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from storage.errors import ArtifactError, MergeInputError

BASE_MODELS, TASK_VECTORS = "base-models", "task-vectors"
DEFAULT_STORE = "file://.mergeline/store"


@dataclass(frozen=True)
class StoredTaskVector:
    """A task vector of the store: where it is and what its manifest says."""

    task: str
    prefix: str
    uri: str
    sha256: str
    meta: dict[str, Any]
    created: str


def parse_params(items: list[str]) -> dict[str, Any]:
    """``k=v`` items (values are YAML scalars, lists or mappings) -> params."""
    from pipelines.spec.load import parse_override

    params: dict[str, Any] = {}
    for item in items:
        path, value = parse_override(item)
        params[".".join(path)] = value
    return params


def parse_coefficient(text: str) -> float | dict[str, float]:
    """A float, or a YAML mapping ``{task: α_t}`` for per-task coefficients."""
    import yaml

    from pipelines.spec.yaml_reader import load_yaml

    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, bool) or not isinstance(value, int | float | dict):
        raise MergeInputError(
            f"--coefficient {text!r} is neither a number nor a mapping like '{{task: 0.3}}'"
        )
    if isinstance(value, dict):
        return {str(task): value[task] for task in value}
    return float(value)


def split_store_uri(ref: str, kind: str, default_store: str) -> tuple[str, str] | None:
    """(store URI, prefix) when ``ref`` names an artifact of ``kind``, else None."""
    marker = f"/{kind}/"
    if "://" in ref and marker in ref:
        store, _, key = ref.rstrip("/").rpartition(marker)
        return store, f"{kind}/{key}"
    if ref.startswith(f"{kind}/"):
        return default_store, ref.rstrip("/")
    return None


def stored_task_vector(store, prefix: str) -> StoredTaskVector:
    from storage.artifacts import find_artifact
    from storage.localfiles import read_manifest

    manifest = read_manifest(store, prefix)
    ref = find_artifact(store, prefix)
    meta = dict(manifest.get("meta", {}))
    if ref is None or meta.get("kind", "task_vector") != "task_vector":
        raise ArtifactError(f"{store.url(prefix)} is not a task vector: check the URI")
    task = str(meta.get("task") or prefix.rsplit("/", 1)[-1])
    return StoredTaskVector(task, prefix, ref.uri, ref.sha256, meta, manifest.get("created", ""))


def find_by_name(store, name: str, base_digest: str) -> StoredTaskVector:
    """The newest task vector named ``name`` built from this base; an error lists the others."""
    found = []
    for key in store.list(TASK_VECTORS):
        try:
            vector = stored_task_vector(store, f"{TASK_VECTORS}/{key}")
        except ArtifactError:
            continue  # not finished, or not a task vector: invisible to readers
        if vector.task == name:
            found.append(vector)
    if not found:
        raise MergeInputError(
            f"--task {name!r}: no task vector with that key or task name in {store.uri}: run the "
            "pipeline that builds it, or pass a task-vectors/<key> URI"
        )
    usable = [v for v in found if v.meta.get("base_digest") == base_digest]
    if not usable:
        listed = ", ".join(f"{v.uri} (base {str(v.meta.get('base_digest'))[:12]})" for v in found)
        raise MergeInputError(
            f"--task {name!r}: no task vector of that name was built from this base "
            f"({base_digest[:12]}); found {listed}: choose the matching --base"
        )
    usable.sort(key=lambda v: v.created, reverse=True)
    if len(usable) > 1 and usable[0].created == usable[1].created:
        tied = ", ".join(v.uri for v in usable if v.created == usable[0].created)
        raise MergeInputError(f"--task {name!r} matches several task vectors: pass one of {tied}")
    return usable[0]


def resolve_base(ref: str, store_uri: str, scratch: Path, mmap: bool = False) -> dict[str, Any]:
    """The base: a store artifact (verified) or a local safetensors directory (digest computed)."""
    from storage.localfiles import read_manifest, verified_path
    from storage.objectstore import open_store
    from storage.shards import SafetensorsReader, digest_model
    from workers.models import huggingface as hf

    located = split_store_uri(ref, BASE_MODELS, store_uri)
    if located is not None:
        store = open_store(located[0])
        meta = read_manifest(store, located[1]).get("meta", {})
        path = verified_path(store, located[1], "model.safetensors", scratch)
        reader = SafetensorsReader(path, mmap=mmap)
        uri = store.url(located[1])
        return {
            "reader": reader,
            "digest": meta.get("digest"),
            "meta": meta,
            "uri": uri,
            "hf_dir": None,
        }
    local = Path(ref.removeprefix("file://"))
    if not local.exists():
        raise MergeInputError(
            f"--base {ref!r} is neither {BASE_MODELS}/<key> in the store nor a local directory "
            "of safetensors: check the path"
        )
    reader = SafetensorsReader(local, mmap=mmap)
    hf_dir = local if local.is_dir() else None
    is_hf = hf_dir is not None and (local / "config.json").is_file()
    return {
        "reader": reader,
        "digest": hf.weights_digest(local) if is_hf else digest_model(reader),
        "meta": {},
        "uri": str(local),
        "hf_dir": hf_dir,
    }


def resolve_tasks(refs: list[str], store_uri: str, base_digest: str) -> list[StoredTaskVector]:
    from storage.objectstore import open_store

    vectors: list[StoredTaskVector] = []
    for ref in refs:
        located = split_store_uri(ref, TASK_VECTORS, store_uri)
        store = open_store(located[0] if located else store_uri)
        prefix = located[1] if located else f"{TASK_VECTORS}/{ref}"
        if located or store.exists(f"{prefix}/manifest.json"):
            vector = stored_task_vector(store, prefix)
            if vector.meta.get("base_digest") != base_digest:
                raise MergeInputError(
                    f"task vector {vector.uri} was built from base "
                    f"{str(vector.meta.get('base_digest'))[:12]}, not from --base "
                    f"({base_digest[:12]}): merge task vectors of the same base"
                )
        else:
            vector = find_by_name(store, ref, base_digest)
        if any(v.task == vector.task for v in vectors):
            raise MergeInputError(f"task '{vector.task}' is given twice: pass each task once")
        vectors.append(vector)
    return vectors


def run_merge(
    base: str,
    tasks: list[str],
    out: str,
    method: str = "task_arithmetic",
    params: dict[str, Any] | None = None,
    coefficient: float | dict[str, float] = 1.0,
    store_uri: str = DEFAULT_STORE,
    max_shard_bytes: int | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """Resolve, verify and merge; returns the merge's figures (see ``merge_files``)."""
    from pipelines.commands.merge_files import (
        hf_side_files,
        merge_files,
        provenance,
        split_unmerged,
    )
    from pipelines.spec.plan import code_version
    from pipelines.stages.streamed_merge import AdapterReader
    from storage.localfiles import verified_paths
    from storage.objectstore import open_store
    from storage.shards import DEFAULT_SHARD_BYTES
    from storage.taskvectors import ADAPTER, DENSE, is_adapter

    if not tasks:
        raise MergeInputError("no --task given: name at least one task vector to merge")
    out_path = Path(out.removeprefix("file://"))
    with tempfile.TemporaryDirectory(prefix="mergeline-merge-") as scratch:
        resolved = resolve_base(base, store_uri, Path(scratch), mmap)
        vectors = resolve_tasks(tasks, store_uri, resolved["digest"])
        on_files = resolved["hf_dir"] is not None
        heads_too = [] if on_files else ["head.safetensors"]
        wanted = [
            (open_store(vector.uri.rpartition(f"/{vector.prefix}")[0]), vector.prefix, name)
            for vector in vectors
            for name in [ADAPTER if is_adapter(vector.meta) else DENSE, *heads_too]
        ]
        paths = iter(verified_paths(wanted, Path(scratch)))  # every file checked before reading
        readers, factors, heads = open_task_vectors(vectors, paths, on_files, bool(heads_too), mmap)
        info = {
            "kind": "merged_model",
            "method": method,
            "params": params or {},
            "coefficient": coefficient,
            "base": {"uri": resolved["uri"], "digest": resolved["digest"]},
            "task_vectors": {v.task: {"uri": v.uri, "sha256": v.sha256} for v in vectors},
            "code_version": code_version(),
        }
        side: dict[str, Any] = {"merge.json": provenance(info)}
        base_reader = resolved["reader"]
        if on_files:
            side |= hf_side_files(resolved["hf_dir"])
            base_reader, kept = split_unmerged(base_reader, readers.values())
            heads |= kept  # written as they are, like the heads
        else:
            side["config.json"] = store_config(resolved["meta"], vectors, info)
        readers |= {task: AdapterReader(f, base_reader.tensors) for task, f in factors.items()}
        statistics = stored_statistics(vectors, method, params or {}, on_files)
        result = merge_files(
            base_reader,
            readers,
            out_path,
            method,
            coefficient,
            params,
            extra_tensors=heads,
            side_files=side,
            max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
            statistics=statistics,
        )
        for reader in [resolved["reader"], *readers.values()]:
            reader.close()
    return result | {"tasks": [v.task for v in vectors]}


def stored_statistics(
    vectors: list[StoredTaskVector], method: str, params: dict[str, Any], on_files: bool
) -> dict[str, Any] | None:
    """A data-aware method's statistics of each task vector, as `mergeline run` stored them
    beside it (verified against their manifests); None for the other methods."""
    from pipelines.commands.merge_files import names_onto_files
    from storage.objectstore import open_store
    from storage.taskvectors import find_statistics, read_statistics
    from workers.merge import get_method

    registered = get_method(method)
    if registered.statistics is None:
        return None
    kind, rows = registered.statistics, registered.validate_params(params).n  # type: ignore[attr-defined]
    found = {}
    for vector in vectors:
        store = open_store(vector.uri.rpartition(f"/{vector.prefix}")[0])
        key = vector.prefix.rsplit("/", 1)[-1]
        if find_statistics(store, key, kind, rows, vector.sha256) is None:
            raise MergeInputError(
                f"--method {method}: task vector {vector.uri} has no {kind} statistics over "
                f"{rows} rows: run `mergeline run` with a {method} candidate (params n: {rows}) "
                "once, which computes and stores them"
            )
        tensors = read_statistics(store, key, kind, rows)
        found[vector.task] = names_onto_files(tensors) if on_files else tensors
    return found


def open_task_vectors(
    vectors: list[StoredTaskVector], paths: Iterator[Path], on_files: bool, heads: bool, mmap: bool
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(readers of the dense task vectors, factors of the adapters, ``heads.<task>.*``), from
    the verified ``paths`` in the order of ``vectors`` (its task-vector file, then its head).

    ``on_files``: a Hugging Face base, whose files name tensors without the pipeline's prefix.
    """
    from pipelines.commands.merge_files import factors_onto_files, onto_files
    from storage.shards import SafetensorsReader
    from storage.taskvectors import is_adapter
    from storage.tensors import bytes_to_tensors
    from workers.adapters.factors import factors_from_tensors

    readers: dict[str, Any] = {}
    factors: dict[str, dict[str, Any]] = {}
    head_tensors: dict[str, Any] = {}
    for vector in vectors:
        path = next(paths)
        if is_adapter(vector.meta):  # small: read whole; each ΔW is computed when merged
            found = factors_from_tensors(
                bytes_to_tensors(path.read_bytes(), vector.uri), vector.uri
            )
            factors[vector.task] = factors_onto_files(found) if on_files else found
        else:
            reader = SafetensorsReader(path, mmap=mmap)
            readers[vector.task] = onto_files(reader) if on_files else reader
        if heads:
            head = bytes_to_tensors(next(paths).read_bytes(), vector.uri)
            head_tensors |= {f"heads.{vector.task}.{k}": v for k, v in head.items()}
    return readers, factors, head_tensors


def store_config(base_meta: dict[str, Any], vectors: list[StoredTaskVector], info: dict) -> bytes:
    """The pipeline's merged-model config.json, read by ``workers.models.merged.load_merged``."""
    config = {
        "format_version": 1,
        "kind": "merged_model",
        "mode": vectors[0].meta.get("mode", "standard"),
        "base_model": base_meta.get("config"),
        "input_dim": base_meta.get("input_dim"),
        "tasks": {v.task: {"num_classes": int(v.meta.get("num_classes", 0))} for v in vectors},
        "candidate": {k: info[k] for k in ("method", "params", "coefficient")},
    }
    return json.dumps(config, indent=1, sort_keys=True).encode()


def merge_command(
    base: Annotated[str, typer.Option(help="base-models/<key> in the store, or a directory.")],
    task: Annotated[list[str], typer.Option(help="Task-vector key/URI or task name (repeat).")],
    out: Annotated[str, typer.Option(help="Output directory (must not exist or be empty).")],
    method: Annotated[str, typer.Option(help="A registered merge method.")] = "task_arithmetic",
    param: Annotated[list[str] | None, typer.Option(help="Method param k=v (repeat).")] = None,
    coefficient: Annotated[str, typer.Option(help="λ, or a mapping {task: α_t}.")] = "1.0",
    store: Annotated[str, typer.Option(help="The object store.")] = DEFAULT_STORE,
    shard_mb: Annotated[int, typer.Option(min=1, help="Largest output shard, in MiB.")] = 2048,
    mmap: Annotated[bool, typer.Option(help="Memory-map inputs instead of reading.")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
) -> None:
    """Merge task vectors already in the store into a sharded model, without a pipeline."""
    import torch

    from pipelines.report.consoles import output_console

    if threads is not None:
        torch.set_num_threads(threads)
    params = parse_params(param or [])
    shard_bytes = shard_mb * 1024 * 1024
    result = run_merge(
        base, task, out, method, params, parse_coefficient(coefficient), store, shard_bytes, mmap
    )
    gigabytes = result["task_vector_bytes"] / 1e9
    output_console().print(
        f"merged {len(result['tasks'])} task vectors with {method} → {result['out']} "
        f"({result['tensors']} tensors, {result['shards']} shard(s), {result['seconds']:.1f}s, "
        f"{gigabytes / max(result['seconds'], 1e-9):.2f} GB/s of task vectors)",
        highlight=False,
    )

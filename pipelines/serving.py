"""The MLflow pyfunc model of a published merge (logged as code: nothing is pickled).

``predict`` takes a 2-D array of features, or for a Hugging Face base a DataFrame with a
``text`` column (:mod:`pipelines.serving_text`; what each MLflow signature asks for), and
``params={"task": name}``, and returns that task's predicted class per row. The type hints
of ``predict`` say which input each model gets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from safetensors.torch import load_file

from storage.shards import SafetensorsReader
from storage.tall import read_tall_directory
from storage.taskvectors import split_merged_tensors
from workers.finetune.linearized import linearized_forward, unpack_linearized
from workers.merge.compression import retrieve_task
from workers.models import apply_head, build_backbone
from workers.models import huggingface as hf


class MergedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        directory = Path(context.artifacts["model"])
        self.backbone, self.state, self.heads = load_merged(directory)
        self.encode = input_encoder(directory)
        self.linear = isinstance(self.state, tuple)
        self.task_states = {} if self.linear else load_task_states(directory, self.state)

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """One predicted class per row of features (MLflow passes the signature's float32
        matrix); ``params={"task": name}`` picks the head."""
        task = (params or {}).get("task") or next(iter(self.heads))
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


mlflow.models.set_model(MergedModel())

"""The MLflow pyfunc model of a published merge (logged as code: nothing is pickled).

``predict`` takes a 2-D array (or DataFrame) of features and ``params={"task": name}`` and
returns that task's predicted class per row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from safetensors.torch import load_file

from storage.taskvectors import split_merged_tensors
from workers.models import apply_head, build_backbone


class MergedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.backbone, self.state, self.heads = load_merged(Path(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):  # untyped: MLflow infers no schema
        task = (params or {}).get("task") or next(iter(self.heads))
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; this model serves {sorted(self.heads)}")
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            logits = apply_head(
                self.heads[task], torch.func.functional_call(self.backbone, self.state, (x,))
            )
        return logits.argmax(dim=1).numpy()


def load_merged(
    directory: Path,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A merged model directory -> (backbone module, merged state, heads)."""
    config = json.loads((directory / "config.json").read_text())
    backbone_state, heads = split_merged_tensors(load_file(str(directory / "model.safetensors")))
    backbone = build_backbone(config["base_model"], int(config["input_dim"]))
    backbone.load_state_dict(backbone_state)
    backbone.eval()
    return backbone, backbone_state, heads


mlflow.models.set_model(MergedModel())

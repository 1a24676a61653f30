"""The MLflow pyfunc model of a published merge (logged as code: nothing is pickled).

``mlflow.pyfunc.log_model`` is given this file (``pipelines.run.publish.SERVING_CODE``): MLflow
copies it into the logged model and runs it at load time, where it needs the mergeline package
installed. The logged artifact ``model`` names the model's files in the store
(:mod:`storage.stored_model`), read from there when the model is loaded. It is only the MLflow
wrapper: loading the merged directory, the forward pass, the task's head and tall_masks
retrieval are :class:`workers.models.merged.MergedPredictor`.

``predict`` takes a 2-D array of features, or for a Hugging Face base a DataFrame with a
``text`` column (:mod:`storage.serving_text`; what each MLflow signature asks for), and
``params={"task": name}``, and returns that task's predicted class per row. The type hints
of ``predict`` say which input each model gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from storage.stored_model import resolve_model_dir
from workers.models.merged import MergedPredictor


class MergedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        """The artifact ``model`` points at the stored model (or, logged before, holds it)."""
        self.model = MergedPredictor(resolve_model_dir(Path(context.artifacts["model"])))

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """One predicted class per row of features (MLflow passes the signature's float32
        matrix); ``params={"task": name}`` picks the head."""
        return self.model.predict(model_input, (params or {}).get("task"))


mlflow.models.set_model(MergedModel())

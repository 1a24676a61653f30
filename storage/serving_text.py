"""The MLflow pyfunc model of a published merge over a Hugging Face base: texts in.

The same model as :mod:`storage.serving`, logged from this file so that ``predict`` is typed
for what MLflow passes it under the text signature: a DataFrame with a ``text`` column.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd

from storage.serving import MergedModel


class MergedTextModel(MergedModel):
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """One predicted class per text (the ``text`` column, or the only column)."""
        return super().predict(context, model_input, params)


mlflow.models.set_model(MergedTextModel())

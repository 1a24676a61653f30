"""The served models say what ``predict`` takes, so MLflow has no type-hint advice to give."""

from __future__ import annotations

import subprocess
import sys
import typing

import numpy as np
import pandas as pd

from tests.conftest import REPO


def test_predict_is_typed_for_the_input_its_signature_gives() -> None:
    from storage.serving import MergedModel
    from storage.serving_text import MergedTextModel

    assert typing.get_type_hints(MergedModel.predict)["model_input"] is np.ndarray
    assert typing.get_type_hints(MergedTextModel.predict)["model_input"] is pd.DataFrame


def test_defining_the_served_models_gives_no_mlflow_warning() -> None:
    code = "import storage.serving, storage.serving_text"
    done = subprocess.run(
        [sys.executable, "-W", "always::UserWarning", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "type hint" not in done.stderr.lower(), done.stderr[-2000:]


def test_a_text_model_published_before_the_move_still_finds_its_base_class() -> None:
    """The serving_text.py copy inside models logged before serving moved to storage/ does
    ``from pipelines.serving import MergedModel`` (commit 598116d and earlier)."""
    from pipelines.serving import MergedModel as Old
    from storage.serving import MergedModel

    assert Old is MergedModel

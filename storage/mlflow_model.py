"""What mergeline writes into MLflow: records built from plain values, and the published model.

Records: params and metrics from nested dicts, dataset inputs that keep our content digests,
the candidates table. The model is a "models from code" pyfunc: its class is read from a
``.py`` file at load time, never pickled; its weights travel as plain artifacts (safetensors +
JSON). ``mlflow.pyfunc.log_model`` and ``mlflow.register_model`` only follow the global
tracking URI, and MLflow prints run links by an environment switch: both are set for a block
and restored.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

MAX_DATASET_DIGEST_LENGTH = 36  # MLflow refuses longer dataset digests
_INVALID_KEY_CHARACTERS = re.compile(r"[^\w./\- :]")


def redact_uri(uri: str) -> str:
    """``uri`` without its ``user:password@`` part, safe to log or show."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_number(value: Any) -> bool:
    """True for ints and floats, not for bools."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def to_text(value: Any) -> str:
    """A param/tag value: JSON unless already text, URI credentials removed."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return redact_uri(text) if "://" in text else text


def to_metrics(values: dict[str, Any], step: int = 0, prefix: str = "") -> list[Metric]:
    """The numeric entries of ``values`` (flattened) as metrics at ``step``."""
    now = int(time.time() * 1000)
    return [
        Metric(_INVALID_KEY_CHARACTERS.sub("_", f"{prefix}{key}"), float(value), now, step)
        for key, value in flatten(values).items()
        if is_number(value)
    ]


def to_dataset_input(name: str, source: str, digest: str, num_rows: int) -> DatasetInput:
    """A dataset input that keeps our content ``digest`` (MLflow's Dataset classes make their own).

    MLflow caps the digest at 36 characters: a sha256 is stored there as a prefix, and in full
    in the profile and in the input tag ``mergeline.digest``.
    """
    scheme, shown = urlsplit(source).scheme, redact_uri(source)
    if scheme in ("http", "https"):
        source_type, source_json = "http", json.dumps({"url": shown})
    else:
        source_type = "local" if scheme in ("", "file") else scheme
        source_json = json.dumps({"uri": shown})
    entity = Dataset(
        name=name,
        digest=digest[:MAX_DATASET_DIGEST_LENGTH],
        source_type=source_type,
        source=source_json,
        profile=json.dumps({"num_rows": num_rows, "digest": digest}),
    )
    tags = [InputTag("mlflow.data.context", "train"), InputTag("mergeline.digest", digest)]
    return DatasetInput(entity, tags)


def to_params(values: dict[str, Any]) -> list[Param]:
    """``values`` (flattened) as params; non-text values as JSON."""
    return [
        Param(_INVALID_KEY_CHARACTERS.sub("_", key), to_text(value))
        for key, value in flatten(values).items()
    ]


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Flat ``rows`` as CSV text; the columns are the union of their keys, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: v if isinstance(v, int | float) else to_text(v) for k, v in row.items()}
        )
    return buffer.getvalue()


# What the published model needs at load time, pinned to this environment, so that MLflow does
# not infer requirements by importing the model in a subprocess (slow, and it runs the code).
_RUNTIME_PACKAGES = ("mlflow", "torch", "safetensors")


def default_pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model: the installed mlflow, torch and safetensors."""
    # Without the local build label (+cpu, +cu124): the serving host installs its own build.
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _RUNTIME_PACKAGES]


@contextmanager
def quiet_run_links(enabled: bool) -> Iterator[None]:
    """Stop MLflow printing "View run at: <tracking URI>/..." (it would show a password)."""
    name = MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name
    previous = os.environ.get(name)
    if enabled:
        os.environ[name] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at ``uri`` for the block, then restore it."""
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def serving_signature(input_width: int, params: dict[str, str]) -> ModelSignature:
    """A float32 feature matrix (or, with ``input_width`` 0, a ``text`` column) in, one label
    per row out; string inference params."""
    from mlflow.types.schema import ColSpec

    inputs = (
        Schema([ColSpec("string", "text")])
        if input_width == 0
        else Schema([TensorSpec(np.dtype(np.float32), (-1, input_width))])
    )
    return ModelSignature(
        inputs=inputs,
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        params=ParamSchema(
            [ParamSpec(name, "string", default) for name, default in params.items()]
        ),
    )


def serving_example(input_width: int) -> Any:
    """An input the signature accepts, logged with the model so that users see its shape."""
    if input_width == 0:
        import pandas as pd

        return pd.DataFrame({"text": ["an example text"]})
    return np.zeros((1, input_width), dtype=np.float32)


def log_and_register(
    tracking_uri: str,
    run_id: str,
    model_dir: str,
    code_path: str,
    registered_model: str,
    tags: dict[str, str],
    pip_requirements: list[str] | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
) -> ModelVersion:
    """Log ``model_dir`` under run ``run_id`` as a pyfunc from ``code_path``; register it.

    The new version carries ``tags``. Leaving the fluent run marks it FINISHED; the caller may
    still set its final status.
    """
    with _global_tracking_uri(tracking_uri):
        # nested=True: the caller may have an unrelated fluent run open.
        with mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=code_path,
                artifacts={"model": model_dir},
                pip_requirements=pip_requirements or default_pip_requirements(),
                tags=tags,
                signature=signature,
                input_example=input_example,
            )
        return mlflow.register_model(info.model_uri, registered_model, tags=tags)


def log_stored_transformers(
    store_cfg: dict[str, Any],
    prefix: str,
    tracking_uri: str,
    run_id: str,
    registered_model: str,
    tags: dict[str, str],
    model_config: dict[str, Any] | None = None,
) -> ModelVersion:
    """:func:`log_and_register_transformers` of the stored merged model at ``prefix``: its
    ``transformers/`` folder read in place from a local store, else copied (verified) to a
    temporary folder here. Publish runs it on a worker, so the driver never loads the model."""
    import tempfile
    from pathlib import Path

    from storage.localfiles import copy_artifact
    from storage.objectstore import open_store_from

    store = open_store_from(store_cfg)
    local = store.local_path(f"{prefix}/transformers")
    if local is not None:
        return log_and_register_transformers(
            tracking_uri, run_id, local, registered_model, tags, model_config=model_config
        )
    with tempfile.TemporaryDirectory(prefix="mergeline-transformers-") as scratch:
        folder = copy_artifact(store, prefix, Path(scratch) / "model", folder="transformers")
        return log_and_register_transformers(
            tracking_uri, run_id, str(folder), registered_model, tags, model_config=model_config
        )


def log_and_register_transformers(
    tracking_uri: str,
    run_id: str,
    model_dir: str,
    registered_model: str,
    tags: dict[str, str],
    task: str = "text-generation",
    model_config: dict[str, Any] | None = None,
) -> ModelVersion:
    """Log a Hugging Face directory (config, safetensors, tokenizer) with MLflow's own
    ``transformers`` flavor under run ``run_id`` as a ``task`` pipeline; register it.
    ``mlflow.pyfunc.load_model`` serves it (``model_config``: generation settings such as
    ``max_new_tokens``), ``mlflow.transformers.load_model`` gives the pipeline itself.

    The pipeline is built in memory: MLflow's log-from-checkpoint-path route reads a pipeline
    class name that transformers 5 no longer exposes.
    """
    import mlflow.transformers
    import transformers

    pipeline = transformers.pipeline(task, model=model_dir, tokenizer=model_dir)
    requirements = [
        f"{name}=={metadata.version(name).split('+')[0]}"
        for name in ("mlflow", "transformers", "torch", "tokenizers", "safetensors")
    ]
    with _global_tracking_uri(tracking_uri):
        with mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.transformers.log_model(
                transformers_model=pipeline,
                task=task,
                name="model",
                tags=tags,
                pip_requirements=requirements,
                model_config=model_config,
            )
        return mlflow.register_model(info.model_uri, registered_model, tags=tags)

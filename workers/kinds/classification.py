"""The ``classification`` kind: a frozen linear-probe head on pooled features, accuracy."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from storage.errors import DataError
from storage.shards import TensorView, write_view
from storage.staged import ArtifactFile, ScratchDirectory, TensorFile
from workers.finetune.engine import Classifier
from workers.kinds.registry import (
    TRANSFORMERS,
    Forward,
    Head,
    MergedWeights,
    Pretrained,
    batched,
    register_kind,
)
from workers.models import huggingface as hf
from workers.models.heads import apply_head, fit_linear_probe

#: Rows per forward pass when features are computed for a head or a score: a split of up to
#: this many rows is one pass, as before; a larger one is cut into passes of this size, so that
#: the activations stay bounded (an encoder's grow with rows × sequence length).
ROWS_PER_PASS = 1024


class Classification:
    name = "classification"
    metrics = ("accuracy",)
    #: a linear-mode merge is also exported as plain weights θ0 + Σ α τ (labelled non-linear)
    export_nonlinear = False
    #: the task of MLflow's transformers flavor it is logged with (None: mergeline's pyfunc)
    mlflow_task: str | None = None
    report_metrics: tuple[str, ...] = ()
    #: what the pipeline's weight names put before the Hugging Face model's own (an encoder)
    hf_prefix = "encoder."

    @torch.no_grad()
    def fit_head(
        self, forward: Forward, x: np.ndarray, y: np.ndarray, num_classes: int, what: str
    ) -> Head:
        features = batched(forward, x, ROWS_PER_PASS)
        if not torch.isfinite(features).all():
            raise DataError(
                f"{what}: the base model's features of its training inputs are not finite: "
                "the inputs are too large for the model; standardise them"
            )
        return fit_linear_probe(features.numpy(), y, num_classes)

    def key_settings(
        self, evaluation: Mapping[str, Any], dataset: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {}  # one metric, and the inputs are what the dataset digest covers

    def frozen_in_linear_mode(self, network: nn.Module) -> set[str]:
        return set()  # the head is a frozen probe outside the network already

    def fast_path(
        self,
        network: nn.Module,
        theta0: Mapping[str, Tensor],
        task_vectors: Mapping[str, Mapping[str, Tensor]],
        heads: Mapping[str, Head],
        splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
        settings: Mapping[str, Any],
    ):
        """The exact fast path: head-projected f(X; θ0) and J f(X; θ0)·τ_s per task."""
        from workers.search.fastpath import build_fast_path

        inputs = {t: torch.as_tensor(x) for t, (x, _) in splits.items()}
        labels = {t: torch.as_tensor(y) for t, (_, y) in splits.items()}
        return build_fast_path(
            network, dict(theta0), dict(task_vectors), dict(heads), inputs, labels
        )

    def trainable(self, network: nn.Module, head: Head) -> nn.Module:
        return Classifier(network, head)

    def loss(self, outputs: Tensor, inputs: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs.float(), labels.to(outputs.device))

    @torch.no_grad()
    def score(
        self,
        forward: Forward,
        head: Head,
        x: np.ndarray,
        y: np.ndarray,
        metric: str,
        settings: Mapping[str, Any],
    ) -> float:
        """Top-1 accuracy of ``head`` on the features (passes of :data:`ROWS_PER_PASS` rows)."""
        logits = apply_head(head, batched(forward, x, ROWS_PER_PASS))
        labels = torch.as_tensor(y)
        return int((logits.argmax(dim=1) == labels).sum()) / max(len(labels), 1)

    # ---------------------------------------------------------------- Hugging Face encoders
    def load_pretrained(self, directory: Path, config: Mapping[str, Any]) -> Pretrained:
        encoder = hf.load_encoder(
            directory, pooling=config["pooling"], attention=config["attn_implementation"]
        )
        hf.load_tokenizer(directory)  # a model without a usable tokenizer fails here, once
        return Pretrained(
            encoder, hf.config_and_tokenizer_files(directory), hf.weights_digest(directory)
        )

    def from_files(
        self, directory: Path, state: Mapping[str, Tensor] | None, config: Mapping[str, Any]
    ) -> nn.Module:
        return hf.encoder_from_files(
            directory, state, config["pooling"], config["attn_implementation"]
        )

    def encode(
        self, x: np.ndarray, tokenizer: Any, max_length: int, dataset: Mapping[str, Any], what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        return hf.tokenize(x, tokenizer, max_length), np.arange(len(x))

    def export(
        self,
        directory: Path,
        merged: MergedWeights | None,
        heads: Mapping[str, Head],
        config: Mapping[str, Any],
    ) -> dict[str, ArtifactFile]:
        """The encoder under its own names (``transformers/``, copied tensor by tensor) and the
        heads beside it: ``heads.safetensors`` (``<task>.weight``, ``<task>.bias``) with
        ``heads.json``."""
        files: dict[str, ArtifactFile] = {
            f"{TRANSFORMERS}/{n}": data
            for n, data in hf.config_and_tokenizer_files(directory).items()
        }
        if merged is not None:
            out = ScratchDirectory("mergeline-export-")  # lives as long as the file names it
            names = {name.removeprefix(self.hf_prefix): name for name in merged.names()}
            write_view(TensorView(merged, names), out.path / "weights", single_file=True)
            files[f"{TRANSFORMERS}/{hf.WEIGHTS}"] = out.file(f"weights/{hf.WEIGHTS}")
        files["heads.safetensors"] = TensorFile(
            {f"{task}.{part}": v for task, head in heads.items() for part, v in head.items()}
        )
        files["heads.json"] = json.dumps(
            {
                "pooling": config["pooling"],
                "max_length": config["max_length"],
                "transformers_weights": merged is not None,
                "tasks": {task: int(head["weight"].shape[0]) for task, head in heads.items()},
            },
            indent=1,
            sort_keys=True,
        ).encode()
        return files


register_kind(Classification())

"""The ``causal_lm`` kind: prompt -> completion through the model's own LM head.

Inputs are int64 ``(rows, 3, length)``: token ids, attention mask and the completion mask
(``workers.data.prompts.encode_prompts``). There is no extra head; the loss is next-token cross
entropy on completion tokens only. Metrics: ``token_accuracy`` (teacher-forced, one forward
pass: the search's default), ``exact_match`` (greedy generation, the final report's), ``nll``,
and ``choice_accuracy`` for multiple-choice data, whose inputs are ``(rows, 3 * C, length)``:
channels 0..2 the right choice, which is all the other metrics and the loss read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from storage.errors import ModelError
from storage.staged import ArtifactFile, ScratchDirectory
from workers.kinds.registry import (
    TRANSFORMERS,
    Forward,
    Head,
    MergedWeights,
    Pretrained,
    register_kind,
)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 16


class CausalLanguageModel:
    name = "causal_lm"
    metrics = ("token_accuracy", "exact_match", "nll", "choice_accuracy")
    #: a linear-mode merge is also exported as plain weights θ0 + Σ α τ (labelled non-linear)
    export_nonlinear = True
    #: the task of MLflow's transformers flavor it is logged with (None: mergeline's pyfunc)
    mlflow_task: str | None = "text-generation"
    report_metrics = ("exact_match",)
    #: what the pipeline's weight names put before the Hugging Face model's own
    hf_prefix = "lm."

    def fit_head(
        self, forward: Forward, x: np.ndarray, y: np.ndarray, num_classes: int, what: str
    ) -> Head:
        return {}  # the model's own LM head (frozen or trained with the body, never apart)

    def key_settings(
        self, evaluation: Mapping[str, Any], dataset: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The stored scores depend on the metric settings; the rows kept, on overflow."""
        return {
            "metric": evaluation.get("metric") or self.metrics[0],
            "max_new_tokens": evaluation.get("max_new_tokens"),
            "overflow": dataset.get("overflow", "refuse"),
        }

    def frozen_in_linear_mode(self, network: nn.Module) -> set[str]:
        """The LM head (with tied embeddings, the shared embedding too) stays at θ0 in linear
        mode: the linearized logits are then W0·(h0 + J_h·δ), affine in the merge
        coefficients, which is what makes the exact fast path possible."""
        from workers.models.causal_lm import head_names

        return head_names(network)

    def fast_path(
        self,
        network: nn.Module,
        theta0: Mapping[str, Tensor],
        task_vectors: Mapping[str, Mapping[str, Tensor]],
        heads: Mapping[str, Head],
        splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
        settings: Mapping[str, Any],
    ):
        """Cached last hidden states h0 and J_h·τ_s at completion positions, scored through
        the frozen head (token accuracy; the search's metric must be token_accuracy)."""
        from workers.search.lm_fastpath import build_lm_fast_path

        batch = int(settings.get("batch_size") or DEFAULT_BATCH_SIZE)
        inputs = {t: x for t, (x, _) in splits.items()}
        return build_lm_fast_path(network, dict(theta0), dict(task_vectors), inputs, batch)

    def trainable(self, network: nn.Module, head: Head) -> nn.Module:
        return network

    def loss(self, outputs: Tensor, inputs: Tensor, labels: Tensor) -> Tensor:
        from workers.search.lm_metrics import completion_loss

        return completion_loss(outputs.float(), inputs.to(outputs.device))

    def score(
        self,
        forward: Forward,
        head: Head,
        x: np.ndarray,
        y: np.ndarray,
        metric: str,
        settings: Mapping[str, Any],
    ) -> float:
        from workers.search import lm_metrics

        batch = int(settings.get("batch_size") or DEFAULT_BATCH_SIZE)
        if metric == "token_accuracy":
            return lm_metrics.token_accuracy(forward, x, batch)
        if metric == "nll":
            return lm_metrics.nll(forward, x, batch)
        if metric == "choice_accuracy":
            return lm_metrics.choice_accuracy(forward, x, batch)
        if metric == "exact_match":
            tokenizer = settings["tokenizer"]
            return lm_metrics.exact_match(
                forward,
                x,
                batch,
                int(settings.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                tokenizer.eos_token_id,
                lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            )
        raise ModelError(f"causal_lm has no metric {metric!r}; known: {list(self.metrics)}")

    # ---------------------------------------------------------------- Hugging Face models
    def load_pretrained(self, directory: Path, config: Mapping[str, Any]) -> Pretrained:
        from storage.digest import digest_state
        from workers.models import causal_lm

        model, tokenizer = causal_lm.load_causal_lm(
            directory, config.get("gguf_file"), config["attn_implementation"]
        )
        files = causal_lm.causal_lm_files(model, tokenizer)
        return Pretrained(model, files, digest_state(model.state_dict()))

    def from_files(
        self, directory: Path, state: Mapping[str, Tensor] | None, config: Mapping[str, Any]
    ) -> nn.Module:
        from workers.models import causal_lm

        return causal_lm.causal_lm_from_files(directory, state, config["attn_implementation"])

    def encode(
        self, x: np.ndarray, tokenizer: Any, max_length: int, dataset: Mapping[str, Any], what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        from workers.data.prompts import encode_prompts

        return encode_prompts(x, tokenizer, max_length, dataset.get("overflow", "refuse"), what)

    def export(
        self,
        directory: Path,
        merged: MergedWeights | None,
        heads: Mapping[str, Head],
        config: Mapping[str, Any],
    ) -> dict[str, ArtifactFile]:
        """A Hugging Face directory under ``transformers/`` (config, sharded safetensors,
        tokenizer, generation config) that ``AutoModelForCausalLM`` loads; without ``merged``
        (a linear-mode merge) the config and tokenizer files only."""
        from workers.models import causal_lm

        files: dict[str, ArtifactFile] = {
            f"{TRANSFORMERS}/{path.name}": path.read_bytes()
            for path in sorted(directory.iterdir())
            if path.is_file()
        }
        if merged is None:
            return files
        out = ScratchDirectory("mergeline-export-")  # lives as long as the files name it
        written = causal_lm.export_weights(merged, out.path / "weights")
        files |= {
            f"{TRANSFORMERS}/{path.name}": out.file(path.relative_to(out.path))
            for path in sorted(written.iterdir())
            if path.is_file()
        }
        return files


register_kind(CausalLanguageModel())

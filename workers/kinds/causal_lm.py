"""The ``causal_lm`` kind: prompt -> completion through the model's own LM head.

Inputs are int64 ``(rows, 3, length)``: token ids, attention mask and the completion mask
(``workers.data.prompts.encode_prompts``). There is no extra head; the loss is next-token cross
entropy on completion tokens only. Metrics: ``token_accuracy`` (teacher-forced, one forward
pass: the search's default), ``exact_match`` (greedy generation, the final report's), ``nll``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor, nn

from storage.errors import ModelError
from workers.kinds.registry import Forward, Head, register_kind

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 16


class CausalLanguageModel:
    name = "causal_lm"
    metrics = ("token_accuracy", "exact_match", "nll")
    report_metrics = ("exact_match",)

    def fit_head(
        self, forward: Forward, x: np.ndarray, y: np.ndarray, num_classes: int, what: str
    ) -> Head:
        return {}  # the model's own LM head (frozen or trained with the body, never apart)

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


register_kind(CausalLanguageModel())

"""Stages 5-6 in the tangent space: the evaluator for linearized scoring and the exact fast path.

:class:`TangentEvaluator` is what a :class:`~pipelines.stages.search.CandidateScorer` holds when
the search runs in the tangent space: in linear mode a candidate is scored as the linearized
model f(x; θ0) + J f(x; θ0)·(θ − θ0), which is how it is served. Its fast path caches the
head-projected f(X_t; θ0) and J(X_t) τ_s once per split, then scores coefficient vectors by
matrix sums: exact for linear-mode task vectors, a post-hoc linearization surrogate for
standard-mode ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

from pipelines.spec.plan import Candidate
from pipelines.stages.search import CandidateScorer, ScoringInputs
from storage.errors import MergeInputError
from workers.finetune import delta_between
from workers.merge.engine import merge_state
from workers.models import apply_head
from workers.search.disentanglement import disentanglement_errors
from workers.search.evaluate import at_state, features_at, linearized_at
from workers.search.fastpath import FastPath, linear_weights
from workers.search.strategies import STRATEGIES, Point

#: Points a stochastic per-task strategy proposes at once on the fast path.
FAST_BATCH = 16


class TangentEvaluator:
    """A merged state in the tangent space: the linearized model in linear mode (a forward pass
    in standard mode), and the fast path for linear-in-τ merges."""

    def __init__(self, inputs: ScoringInputs, mode: str = "standard") -> None:
        if inputs.device.type != "cpu":  # the spec check refuses this before any work
            raise MergeInputError("the tangent-space evaluator runs on the CPU only")
        self.inputs, self.mode = inputs, mode
        self._fast_paths: dict[str, FastPath] = {}

    reuse_buffers = False  # the merged tensors are kept as a state dict

    def model_at(
        self, tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """In linear mode a merged state is scored as the linearized model it is served as."""
        inputs, state = self.inputs, dict(tensors)
        if self.mode != "linear":
            return at_state(inputs.backbone, state)
        return linearized_at(inputs.backbone, inputs.base, delta_between(state, inputs.base))

    def fast_path(self, split: str = "val") -> FastPath:
        if split not in self._fast_paths:
            inputs = self.inputs
            splits = {t: s.split(split) for t, s in inputs.splits.items()}
            self._fast_paths[split] = inputs.kind.fast_path(
                inputs.backbone,
                inputs.base,
                inputs.task_vectors,
                inputs.heads,
                splits,
                inputs.settings,
            )
        return self._fast_paths[split]

    def fast_score(self, candidates: list[Candidate], split: str = "val") -> list[dict[str, Any]]:
        """Per-task accuracy of each candidate through the fast path (linear-in-τ methods)."""
        fast = self.fast_path(split)
        weights = []
        for candidate in candidates:
            row = linear_weights(
                candidate.method, candidate.params, candidate.coefficient, fast.sources
            )
            if row is None:
                raise MergeInputError(
                    f"candidate {candidate.id}: the fast path scores only merges linear in the "
                    "task vectors (task_arithmetic, weight_average without params)"
                )
            weights.append(row)
        accuracies = fast.accuracies(torch.tensor(weights, dtype=torch.float32))
        return [
            {"id": c.id, "accuracy": {t: float(accuracies[t][i]) for t in fast.tasks}}
            for i, c in enumerate(candidates)
        ]

    def fast_per_task_search(
        self,
        strategy: str,
        grid: list[float],
        budget: int | None,
        objective: str,
        finetuned: dict[str, float],
        seed: int = 0,
    ) -> list[tuple[dict[str, float], dict[str, float]]]:
        """Run a per-task strategy entirely on the fast path (task_arithmetic coefficients).

        Returns (coefficients, per-task val accuracy) for every point the strategy evaluated.
        """
        fast = self.fast_path("val")
        scale = torch.tensor(
            [
                1.0 / max(finetuned[t], 1e-12) if objective != "mean_accuracy" else 1.0
                for t in fast.tasks
            ],
            dtype=torch.float64,
        )
        evaluated: dict[Point, torch.Tensor] = {}

        def evaluate(points: list[Point]) -> list[float]:
            matrix = fast.accuracy_matrix(torch.tensor(points, dtype=torch.float32))  # (B, T)
            evaluated.update(zip(points, matrix, strict=True))
            return ((matrix * scale).mean(dim=1)).tolist()

        # A batch is one matrix product here: a stochastic strategy may propose many at once.
        scores = STRATEGIES[strategy](
            evaluate, len(fast.sources), grid, budget, seed=seed, batch=FAST_BATCH
        )
        return [
            (
                dict(zip(fast.sources, point, strict=True)),
                dict(zip(fast.tasks, evaluated[point].tolist(), strict=True)),
            )
            for point in scores
        ]

    def predict_labels(
        self, task: str, points: list[tuple[float, ...]], split: str = "val"
    ) -> torch.Tensor:
        """(B, N) predicted labels on ``task``'s split for θ0 + Σ_s α_s τ_s, α = each point.

        Linear mode: the exact fast path; standard mode: a real forward pass per point.
        """
        if self.mode == "linear":
            fast = self.fast_path(split)
            return fast.logits(torch.tensor(points, dtype=torch.float32), task).argmax(dim=2)
        inputs = self.inputs
        x = torch.as_tensor(inputs.splits[task].split(split)[0])
        labels = []
        for point in points:
            coefficients = dict(zip(inputs.task_vectors, point, strict=True))
            state = merge_state("task_arithmetic", inputs.base, inputs.task_vectors, coefficients)
            labels.append(
                apply_head(inputs.heads[task], features_at(inputs.backbone, state, x)).argmax(1)
            )
        return torch.stack(labels)


def disentanglement_job(
    store_cfg: dict[str, Any],
    base_key: str,
    base_meta: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
    evaluation: dict[str, Any],
    mode: str,
    alphas: list[float],
    split: str,
) -> list[list[float]]:
    """ξ(α1, α2) over ``alphas``² for the two tasks of ``tasks`` (see workers.search)."""
    evaluator = partial(TangentEvaluator, mode=mode)
    scorer = CandidateScorer(store_cfg, base_key, base_meta, tasks, evaluation, evaluator)
    pair = tuple(tasks)
    errors = disentanglement_errors(
        lambda task, points: scorer.predict_labels(task, points, split), pair, alphas
    )
    return errors.tolist()

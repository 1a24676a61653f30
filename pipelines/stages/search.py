"""Stages 5-6: score merge candidates on every task's validation split, then the best on test.

A :class:`CandidateScorer` loads θ0, the task vectors, the heads and the evaluation splits once
(:class:`ScoringInputs`), then scores many candidates; the driver runs several of them as Ray
actors. The scorer builds each candidate's merged weights and asks its evaluator how a merged
model runs: a forward pass at those weights (:class:`ForwardEvaluator`), or the tangent space's
linearized forward with its exact fast path
(:class:`~pipelines.stages.tangent_search.TangentEvaluator`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from pipelines.spec.plan import Candidate, task_params
from pipelines.stages.base import Base, load_task_data, open_base, open_task_vector
from pipelines.stages.statistics import statistics_params
from storage.errors import MergeInputError, ModelError
from workers.merge.engine import merge_state
from workers.search.evaluate import at_state
from workers.search.halving import validation_subset


class ScoringInputs:
    """What every score reads, loaded once: θ0 and the backbone, each task's vector, head and
    evaluation splits, and the data-aware methods' statistics as they are asked for."""

    def __init__(
        self,
        store_cfg: dict[str, Any],
        base_key: str,
        base_meta: dict[str, Any],
        tasks: dict[str, dict[str, Any]],
        evaluation: dict[str, Any],
        device: str = "cpu",
    ) -> None:
        """``tasks`` maps task name -> {"key": task-vector key, "dataset": dataset spec};
        ``device``: where the evaluator runs the model (the merged weights are built on the
        host, then copied there)."""
        self.store_cfg, self.keys = store_cfg, {name: task["key"] for name, task in tasks.items()}
        self.device = torch.device(device)
        self._statistics: dict[tuple[str, int], Any] = {}
        self._subsets: dict[tuple[str, int, int], Any] = {}
        opened: Base = open_base(store_cfg, base_key, base_meta)
        self.base, self.backbone = opened.theta0, opened.backbone
        self.kind, self.settings = opened.kind, opened.settings(evaluation)
        self.task_vectors: dict[str, dict[str, torch.Tensor]] = {}
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        self.splits = {}
        for name, task in tasks.items():
            self.task_vectors[name], self.heads[name] = open_task_vector(
                store_cfg, task["key"], self.base
            )
            self.splits[name] = load_task_data(
                opened, task["dataset"], evaluation, f"tasks[{name}].dataset"
            )

    def split_rows(self, split: str = "val") -> dict[str, int]:
        """Rows of ``split`` per task (after tokenizing)."""
        return {task: len(data.split(split)[1]) for task, data in self.splits.items()}

    def data(self, task: str, split: str, rows: dict[str, int] | None, seed: int):
        """``task``'s inputs and labels on ``split``, or on ``rows[task]`` of them drawn with
        ``seed``."""
        x, y = self.splits[task].split(split)
        count = None if rows is None else rows[task]
        if count is None or count >= len(y):
            return x, y
        key = (f"{task}/{split}", count, seed)
        if key not in self._subsets:
            num_classes = self.splits[task].num_classes
            self._subsets[key] = validation_subset(task, y, num_classes, count, seed)
        index = self._subsets[key]
        return x[index], y[index]

    def merged(self, candidate: Candidate) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(task, merged state) pairs: one shared model, or one per task for retrieval methods."""
        statistics = statistics_params(
            self.store_cfg, self.keys, candidate.method, candidate.params, self._statistics
        )
        by_task = task_params(candidate, list(self.task_vectors))
        if by_task is not None:
            for task, params in by_task.items():
                yield (
                    task,
                    merge_state(
                        candidate.method,
                        self.base,
                        self.task_vectors,
                        candidate.coefficient,
                        **params,
                    ),
                )
            return
        state = merge_state(
            candidate.method,
            self.base,
            self.task_vectors,
            candidate.coefficient,
            **candidate.params,
            **statistics,
        )
        for task in self.task_vectors:
            yield task, state


class Evaluator(Protocol):
    """How a merged state is run when a candidate is scored."""

    def model_at(self, state: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model (a forward function) at the merged parameters ``state``."""
        ...


@runtime_checkable
class FastEvaluator(Evaluator, Protocol):
    """An evaluator that also scores coefficient vectors without forward passes."""

    def fast_score(self, candidates: list[Candidate], split: str) -> list[dict[str, Any]]: ...

    def fast_per_task_search(
        self,
        strategy: str,
        grid: list[float],
        budget: int | None,
        objective: str,
        finetuned: dict[str, float],
        seed: int,
    ) -> list[tuple[dict[str, float], dict[str, float]]]: ...

    def predict_labels(
        self, task: str, points: list[tuple[float, ...]], split: str
    ) -> torch.Tensor: ...


class ForwardEvaluator:
    """Standard mode: a merged state is evaluated by a forward pass at it, on the scorer's
    device (the backbone moves there once; each merged state is copied there)."""

    def __init__(self, inputs: ScoringInputs) -> None:
        self.inputs = inputs
        if inputs.device.type != "cpu":
            inputs.backbone.to(inputs.device)

    def model_at(self, state: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return at_state(self.inputs.backbone, state, self.inputs.device)


class CandidateScorer:
    """The scorer actor: per-task scores of merge candidates, asked of its evaluator."""

    def __init__(
        self,
        store_cfg: dict[str, Any],
        base_key: str,
        base_meta: dict[str, Any],
        tasks: dict[str, dict[str, Any]],
        evaluation: dict[str, Any],
        evaluator: Callable[[ScoringInputs], Evaluator] = ForwardEvaluator,
        threads: int = 1,
        device: str = "cpu",
    ) -> None:
        """``tasks`` maps task name -> {"key": task-vector key, "dataset": dataset spec};
        ``evaluator`` makes the evaluator from the loaded inputs (default: forward passes);
        ``threads``: torch's threads (the CPUs Ray gave the actor); ``device``: ``cuda`` for
        an actor given a GPU (``merge.resources.num_gpus``)."""
        torch.set_num_threads(threads)
        if device != "cpu" and not torch.cuda.is_available():
            raise ModelError(
                "merge.resources.num_gpus: this scorer was given a GPU but torch sees no CUDA "
                "device: install a CUDA build of torch on the cluster's GPU nodes"
            )
        self.inputs = ScoringInputs(store_cfg, base_key, base_meta, tasks, evaluation, device)
        self.evaluator = evaluator(self.inputs)

    def score(
        self,
        candidates: list[Candidate],
        split: str = "val",
        metric: str | None = None,
        rows: dict[str, int] | None = None,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        """Per-task score on ``split`` for each candidate, in order: the search metric
        (``evaluation.metric``, default the kind's first), or ``metric``. The per-task dict is
        keyed ``accuracy`` whatever the metric, as the objectives read it. ``rows``: score on
        that many rows of each task only (successive halving's rungs), a subset drawn with
        ``seed`` by :func:`~workers.search.halving.validation_subset`."""
        return [self._score_one(candidate, split, metric, rows, seed) for candidate in candidates]

    def split_rows(self, split: str = "val") -> dict[str, int]:
        """Rows of ``split`` per task, as this scorer reads them (after tokenizing)."""
        return self.inputs.split_rows(split)

    def fast_score(self, candidates: list[Candidate], split: str = "val") -> list[dict[str, Any]]:
        """Per-task accuracy of each candidate through the evaluator's fast path."""
        return self._fast("fast_score").fast_score(candidates, split)

    def fast_per_task_search(
        self,
        strategy: str,
        grid: list[float],
        budget: int | None,
        objective: str,
        finetuned: dict[str, float],
        seed: int = 0,
    ) -> list[tuple[dict[str, float], dict[str, float]]]:
        """A per-task coefficient search run entirely on the evaluator's fast path."""
        evaluator = self._fast("fast_per_task_search")
        return evaluator.fast_per_task_search(strategy, grid, budget, objective, finetuned, seed)

    def predict_labels(
        self, task: str, points: list[tuple[float, ...]], split: str = "val"
    ) -> torch.Tensor:
        """(B, N) predicted labels on ``task``'s split for θ0 + Σ_s α_s τ_s, α = each point."""
        return self._fast("predict_labels").predict_labels(task, points, split)

    def _fast(self, what: str) -> FastEvaluator:
        if not isinstance(self.evaluator, FastEvaluator):
            raise MergeInputError(
                f"{what}: this scorer evaluates by forward passes only; start it with the "
                "tangent evaluator (pipelines.stages.tangent_search.TangentEvaluator)"
            )
        return self.evaluator

    def _score_one(
        self,
        candidate: Candidate,
        split: str,
        metric: str | None,
        rows: dict[str, int] | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        inputs = self.inputs
        metric = metric or inputs.settings["metric"]
        per_task: dict[str, float] = {}
        for task, state in inputs.merged(candidate):
            per_task[task] = inputs.kind.score(
                self.evaluator.model_at(state),
                inputs.heads[task],
                *inputs.data(task, split, rows, seed),
                metric,
                inputs.settings,
            )
        return {"id": candidate.id, "accuracy": per_task}

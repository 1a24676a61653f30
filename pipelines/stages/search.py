"""Stages 5-6: score merge candidates on every task's validation split, then the best on test.

A :class:`CandidateScorer` loads θ0, the task vectors, the heads and the evaluation splits
once, then scores many candidates; the driver runs several of them as Ray actors.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.spec.plan import Candidate, task_params
from pipelines.stages.base import load_task_data, open_base, open_task_vector
from pipelines.stages.statistics import statistics_params
from workers.merge.engine import merge_state
from workers.search.evaluate import at_state
from workers.search.halving import validation_subset


class CandidateScorer:
    def __init__(
        self,
        store_cfg: dict[str, Any],
        base_key: str,
        base_meta: dict[str, Any],
        tasks: dict[str, dict[str, Any]],
        evaluation: dict[str, Any],
    ) -> None:
        """``tasks`` maps task name -> {"key": task-vector key, "dataset": dataset spec}."""
        torch.set_num_threads(1)
        self.store_cfg, self.keys = store_cfg, {name: task["key"] for name, task in tasks.items()}
        self._statistics: dict[tuple[str, int], Any] = {}
        self._subsets: dict[tuple[str, int, int], Any] = {}
        opened = open_base(store_cfg, base_key, base_meta)
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
        return {task: len(data.split(split)[1]) for task, data in self.splits.items()}

    def _data(self, task: str, split: str, rows: dict[str, int] | None, seed: int):
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

    def _forward(self, state: dict[str, torch.Tensor]):
        """How a merged state is evaluated: a forward pass at that state."""
        return at_state(self.backbone, state)

    def _score_one(
        self,
        candidate: Candidate,
        split: str,
        metric: str | None,
        rows: dict[str, int] | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        metric = metric or self.settings["metric"]
        per_task: dict[str, float] = {}
        for task, state in self._models(candidate):
            per_task[task] = self.kind.score(
                self._forward(state),
                self.heads[task],
                *self._data(task, split, rows, seed),
                metric,
                self.settings,
            )
        return {"id": candidate.id, "accuracy": per_task}

    def _models(self, candidate: Candidate):
        """(task, merged state) pairs: one shared model, or one per task for retrieval methods."""
        statistics = self._statistics_for(candidate)
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

    def _statistics_for(self, candidate: Candidate) -> dict[str, Any]:
        """A data-aware method's statistics (read once per statistic and row count)."""
        return statistics_params(
            self.store_cfg, self.keys, candidate.method, candidate.params, self._statistics
        )

"""Stages 5-6: score merge candidates on every task's validation split, then the best on test.

A :class:`CandidateScorer` loads θ0, the task vectors, the heads and the evaluation splits once
(:class:`ScoringInputs`), then scores many candidates; the driver runs several of them as Ray
actors. The scorer builds each candidate's merged weights and asks its evaluator how a merged
model runs: a forward pass at those weights (:class:`ForwardEvaluator`), or the tangent space's
linearized forward with its exact fast path
(:class:`~pipelines.stages.tangent_search.TangentEvaluator`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from pipelines.spec.plan import Candidate, task_params
from pipelines.stages.base import load_task_data, open_base_streamed, open_task_source
from pipelines.stages.statistics import statistics_params
from pipelines.stages.streamed_merge import reader_specs
from storage.errors import MergeInputError, ModelError
from storage.shards import SafetensorsReader, ShardedWriter
from storage.staged import ScratchDirectory
from workers.adapters import LoraDelta
from workers.merge import get_method
from workers.merge.backbone import compute_dtype_of
from workers.merge.engine import (
    TensorSpec,
    ZeroSource,
    merge_stream,
    plan_merge,
    scaled_stream,
)
from workers.models.weights import write_weights
from workers.search.evaluate import forward_on
from workers.search.halving import validation_subset


class ScoringInputs:
    """What every score reads, opened once: the backbone at θ0 (in the evaluation dtype, on the
    scorer's device), readers of θ0's and each task vector's node-local files, each task's head
    and evaluation splits, and the data-aware methods' statistics as they are asked for.

    No state dict of θ0 or of a task vector is held: a candidate's weights are merged tensor by
    tensor from the readers (:meth:`merged`), so memory is one model plus a few tensors,
    whatever the number of tasks. The tangent evaluator, which needs them whole, reads
    :attr:`base` and :attr:`task_vectors` (loaded on first use).
    """

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
        ``device``: where the backbone sits and every merged tensor is written."""
        self.store_cfg, self.keys = store_cfg, {name: task["key"] for name, task in tasks.items()}
        self.device = torch.device(device)
        self._statistics: dict[tuple[str, int], Any] = {}
        self._subsets: dict[tuple[str, int, int], Any] = {}
        self._dense: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        opened, self.base_reader = open_base_streamed(
            store_cfg, base_key, base_meta, evaluation.get("dtype")
        )
        self.backbone = opened.backbone.to(self.device)
        self.kind, self.settings = opened.kind, opened.settings(evaluation)
        self.sources: dict[str, Any] = {}
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        self.splits = {}
        for name, task in tasks.items():
            self.sources[name], self.heads[name] = open_task_source(
                store_cfg, task["key"], self.base_reader.tensors
            )
            self.splits[name] = load_task_data(
                opened, task["dataset"], evaluation, f"tasks[{name}].dataset"
            )
        self._specs = reader_specs(self.base_reader)
        self._task_specs = {name: reader_specs(source) for name, source in self.sources.items()}
        self.deltas = DeltaFiles()

    @property
    def base(self) -> dict[str, torch.Tensor]:
        """θ0 as a state dict (read whole on first use: the tangent evaluator's)."""
        return self._load_dense()[0]

    @property
    def task_vectors(self) -> dict[str, Any]:
        """Each task vector as a mapping over θ0's tensors (read whole on first use)."""
        return self._load_dense()[1]

    def _load_dense(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self._dense is None:
            reader = self.base_reader
            base = {name: reader.read(name) for name in reader.names()}
            vectors = {
                task: source
                if isinstance(source, LoraDelta)
                else {name: source.read(name) for name in source.names()}
                for task, source in self.sources.items()
            }
            self._dense = base, vectors
        return self._dense

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

    def merged(
        self, candidate: Candidate, reuse_buffers: bool = False
    ) -> Iterator[tuple[list[str], Iterator[tuple[str, torch.Tensor]]]]:
        """(tasks, merged tensors) pairs: every task on one shared model, or one task each for
        retrieval methods. The tensors are merged one at a time as they are read; with
        ``reuse_buffers`` a yielded tensor may be overwritten by the next one."""
        statistics = statistics_params(
            self.store_cfg, self.keys, candidate.method, candidate.params, self._statistics
        )
        by_task = task_params(candidate, list(self.sources))
        if by_task is not None:
            for task, params in by_task.items():
                merged = self._merge(candidate, params, candidate.coefficient, None, reuse_buffers)
                yield [task], merged
            return
        stats = statistics.get("statistics")
        if (
            isinstance(candidate.coefficient, int | float)
            and get_method(candidate.method).scales_delta
        ):
            delta = self._delta(candidate, stats)
            lam = float(candidate.coefficient)
            yield list(self.sources), scaled_stream(self._specs, self.base_reader, delta, lam)
            return
        merged = self._merge(
            candidate, candidate.params, candidate.coefficient, stats, reuse_buffers
        )
        yield list(self.sources), merged

    def _merge(
        self,
        candidate: Candidate,
        params: dict[str, Any],
        coefficient: Any,
        statistics: Any,
        reuse_buffers: bool,
        zero: list[TensorSpec] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The streamed merge of ``candidate``'s method with ``params`` and ``coefficient``
        onto θ0, or onto zeros of the specs ``zero``."""
        specs = self._specs if zero is None else zero
        base = self.base_reader if zero is None else ZeroSource(zero)
        plan = plan_merge(candidate.method, specs, self._task_specs, coefficient, params)
        return merge_stream(
            plan, base, self.sources, reuse_buffers=reuse_buffers, statistics=statistics
        )

    def _delta(self, candidate: Candidate, statistics: Any) -> SafetensorsReader:
        """Δ of ``candidate``'s method and params (``scales_delta``): its merge at λ = 1 onto a
        zero θ0 held in the compute dtype, so that finish(θ0, Δ, λ) is the merge at λ."""
        zero = [TensorSpec(s.name, compute_dtype_of(s.dtype), s.shape) for s in self._specs]
        key = json.dumps([candidate.method, candidate.params], sort_keys=True)
        return self.deltas.get(
            key, zero, lambda: self._merge(candidate, candidate.params, 1.0, statistics, True, zero)
        )


class DeltaFiles:
    """The Δ of the last method and params scored with a shared coefficient, kept in a local
    scratch file: a coefficient grid merges the task vectors once per method and params, and
    each λ of it then reads θ0 and Δ only (memory stays one tensor of each)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.reader: SafetensorsReader | None = None
        self._scratch: ScratchDirectory | None = None

    def get(
        self,
        key: str,
        specs: list[TensorSpec],
        stream: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    ) -> SafetensorsReader:
        """Δ's reader for ``key``, written from ``stream`` (tensors in ``specs``' order) unless
        it is the one kept."""
        if key != self.key or self.reader is None:
            self.close()
            scratch = ScratchDirectory.of_this_process("mergeline-delta-")
            entries = [(spec.name, spec.dtype, spec.shape) for spec in specs]
            writer = ShardedWriter(scratch.path / "delta", entries, single_file=True)
            try:
                for name, tensor in stream():
                    writer.write(name, tensor)
                directory = writer.finish()
            except BaseException:
                writer.abort()
                raise
            self.key, self.reader, self._scratch = key, SafetensorsReader(directory), scratch
        return self.reader

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.key, self.reader, self._scratch = None, None, None


class Evaluator(Protocol):
    """How a merged state is run when a candidate is scored."""

    #: Whether :meth:`model_at` is done with each tensor before asking for the next (so the
    #: merge may write the next one into the same buffer).
    reuse_buffers: bool

    def model_at(
        self, tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model (a forward function) at the merged parameters ``tensors``."""
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
    device: each merged tensor is written into the backbone (already there, in the evaluation
    dtype) as it is computed, and batches go there."""

    reuse_buffers = True

    def __init__(self, inputs: ScoringInputs) -> None:
        self.inputs = inputs

    def model_at(
        self, tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        write_weights(self.inputs.backbone, tensors)
        return forward_on(self.inputs.backbone, self.inputs.device)


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
        for tasks, tensors in inputs.merged(candidate, self.evaluator.reuse_buffers):
            model = self.evaluator.model_at(tensors)
            for task in tasks:
                per_task[task] = inputs.kind.score(
                    model,
                    inputs.heads[task],
                    *inputs.data(task, split, rows, seed),
                    metric,
                    inputs.settings,
                )
        return {"id": candidate.id, "accuracy": per_task}

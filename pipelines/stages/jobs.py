"""The typed argument of each stage's Ray task: what the job needs, as plain picklable data.

The spec sections (``finetune``, ``evaluation``, ``base_model``) stay the plan's JSON dicts: they
are what the cache keys digest and the manifests record, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.spec.plan import Candidate
from pipelines.spec.refs import BaseModelRef, DatasetRef, TaskVectorRef

Need = tuple[str, int]  # (statistic, rows)


@dataclass(frozen=True)
class PretrainJob:
    """What the base model's job needs: the store, the base's cache key and spec section."""

    store: dict[str, Any]  # open_store_from's config
    key: str
    base_model: dict[str, Any]
    evaluation: dict[str, Any]
    input_dim: int


@dataclass(frozen=True)
class FinetuneJob:
    """What one task's fine-tune needs: the store, the task vector's cache key, the task's data,
    the stored base and the spec's ``finetune`` and ``evaluation`` sections."""

    store: dict[str, Any]  # open_store_from's config
    key: str
    dataset: DatasetRef
    base: BaseModelRef
    finetune: dict[str, Any]
    evaluation: dict[str, Any]

    @property
    def task(self) -> str:
        return self.dataset.task


@dataclass(frozen=True)
class StatisticsJob:
    """What one task vector's statistics need: the store, the task vector, its task's data,
    the stored base, the spec's ``evaluation`` section and the (statistic, rows) to compute."""

    store: dict[str, Any]  # open_store_from's config
    vector: TaskVectorRef
    dataset: DatasetRef
    base: BaseModelRef
    evaluation: dict[str, Any]
    needs: tuple[Need, ...]


@dataclass(frozen=True)
class PublishJob:
    """What the publish job needs: the store, the stored base and task vectors, the chosen
    candidate, the registered name and run, and the merged model's manifest config and meta."""

    store: dict[str, Any]  # open_store_from's config
    base: BaseModelRef
    vectors: dict[str, TaskVectorRef]
    candidate: Candidate
    name: str
    run_id: str
    config: dict[str, Any]
    meta: dict[str, Any]

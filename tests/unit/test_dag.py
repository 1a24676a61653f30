"""One module creates Ray tasks; the typed jobs and refs the stages exchange travel as they are."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from ray import cloudpickle

from pipelines.spec.plan import Candidate
from pipelines.spec.refs import BaseModelRef, DatasetRef, MergedModelRef, TaskVectorRef
from pipelines.stages.jobs import FinetuneJob, PretrainJob, PublishJob, StatisticsJob
from storage.artifacts import ArtifactRef

REPO = Path(__file__).resolve().parents[2]
CREATES_RAY_WORK = {"pipelines/run/dag.py"}


def test_only_the_dag_module_makes_functions_remote() -> None:
    found = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "pipelines").rglob("*.py")
        if "ray.remote(" in path.read_text()
    }
    assert found <= CREATES_RAY_WORK, f"ray.remote outside run/dag.py: {found - CREATES_RAY_WORK}"


def _jobs() -> list[object]:
    store = {"uri": "file:///tmp/store"}
    base = BaseModelRef.from_artifact(
        "b" * 32,
        ArtifactRef("file:///tmp/store/base-models/x", "base-models/x", "0" * 64, {"digest": "d"}),
    )
    vector = TaskVectorRef("a", "k" * 32, "file:///tmp/store/task-vectors/k", "1" * 64, {})
    dataset = DatasetRef("a", {"source": "sklearn", "name": "digits"}, "2" * 64)
    candidate = Candidate("task_arithmetic", {}, 0.5)
    return [
        PretrainJob(store, base.key, {"source": "builtin"}, {}, 8),
        FinetuneJob(store, vector.key, dataset, base, {"mode": "standard"}, {}),
        StatisticsJob(store, vector, dataset, base, {}, (("gram", 64),)),
        PublishJob(store, base, {"a": vector}, candidate, "m", "run", {}, {}),
        MergedModelRef("m", "run", "file:///tmp/store/models/m/run", "models/m/run", "3" * 64),
    ]


@pytest.mark.parametrize("job", _jobs(), ids=lambda job: type(job).__name__)
def test_jobs_and_refs_are_frozen_and_pickle_as_they_are(job: object) -> None:
    assert cloudpickle.loads(cloudpickle.dumps(job)) == job  # how Ray ships a task's arguments
    first = dataclasses.fields(job)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(job, first, None)


def test_a_dataset_ref_names_the_spec_field_of_its_errors() -> None:
    assert DatasetRef("mnist", {}).what == "tasks[mnist].dataset"

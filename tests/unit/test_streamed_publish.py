"""The publish stage merges tensor by tensor from θ0's and the task vectors' files into the
published ``model.safetensors``: the same tensors as the merge in memory, in the layout every
reader reads, and never more than one tensor of each input alive at once (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipelines.stages.publish as publish_stage
from pipelines.spec.plan import Candidate
from pipelines.spec.refs import BaseModelRef, TaskVectorRef
from pipelines.stages.jobs import PublishJob
from storage.objectstore import open_store
from storage.taskvectors import read_base_model, read_task_vector
from tests.counting import Counted
from tests.unit.test_streamed_scorer import BASE, stored_inputs
from workers.finetune import pack_linearized
from workers.merge import merge
from workers.models.merged import MergedPredictor

CANDIDATES = [
    Candidate("task_arithmetic", {}, 0.4),
    Candidate("ties", {"density": 0.3, "scope": "global"}, 0.9),
    Candidate("tsv", {}, 0.7),
]


def publish_job(tmp_path: Path, tasks: int, candidate: Candidate, mode: str) -> PublishJob:
    store_cfg, meta, specs = stored_inputs(tmp_path, tasks)
    base = BaseModelRef("base", "", "", meta | {"digest": "d"})
    vectors = {name: TaskVectorRef(name, name, "", "", {"mode": mode}) for name in specs}
    config = {
        "format_version": 1,
        "kind": "merged_model",
        "mode": mode,
        "base_model": BASE,
        "input_dim": 64,
        "tasks": {name: {"num_classes": 10} for name in specs},
        "candidate": {"method": candidate.method, "params": candidate.params},
    }
    return PublishJob(store_cfg, base, vectors, candidate, "m", "run-1", config, {"run_id": "r"})


def in_memory(job: PublishJob) -> tuple[dict, dict, dict]:
    """θ0, the merge of whole state dicts (``workers.merge.merge``) and the heads."""
    store = open_store(job.store["uri"])
    theta0 = read_base_model(store, "base")
    read = {task: read_task_vector(store, task) for task in job.vectors}
    vectors = {task: delta for task, (delta, _) in read.items()}
    candidate = job.candidate
    merged = merge(candidate.method, theta0, vectors, candidate.coefficient, **candidate.params)
    return theta0, merged, {task: head for task, (_, head) in read.items()}


def published(job: PublishJob, tmp_path: Path) -> Path:
    ref = publish_stage.merge_and_store_job(job)
    return tmp_path / "store" / ref.prefix


@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda c: c.method)
def test_the_published_merge_equals_the_merge_in_memory(
    tmp_path: Path, candidate: Candidate
) -> None:
    job = publish_job(tmp_path, 3, candidate, "standard")
    directory = published(job, tmp_path)
    _, expected, heads = in_memory(job)
    tensors = load_file(str(directory / "model.safetensors"))
    assert set(tensors) == set(expected) | {
        f"heads.{t}.{k}" for t, head in heads.items() for k in head
    }
    for name, tensor in expected.items():
        torch.testing.assert_close(tensors[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    for task, head in heads.items():
        for key, value in head.items():
            assert torch.equal(tensors[f"heads.{task}.{key}"], value)
    predictor = MergedPredictor(directory)  # the serving code reads it as it is
    assert predictor.predict(torch.zeros(2, 64).numpy(), "perm1").shape == (2,)


def test_a_linear_mode_merge_is_published_as_theta0_and_its_direction(tmp_path: Path) -> None:
    job = publish_job(tmp_path, 2, CANDIDATES[0], "linear")
    directory = published(job, tmp_path)
    theta0, merged, _ = in_memory(job)
    tensors = load_file(str(directory / "model.safetensors"))
    for name, tensor in pack_linearized(theta0, merged).items():
        torch.testing.assert_close(tensors[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert MergedPredictor(directory).linear


@pytest.mark.parametrize("tasks", [2, 6])
@pytest.mark.parametrize("mode", ["standard", "linear"])
def test_publish_holds_one_tensor_of_each_input_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tasks: int, mode: str
) -> None:
    counter = {"alive": 0, "peak": 0, "reads": 0}
    real_reader, real_source = publish_stage.SafetensorsReader, publish_stage.open_task_source

    def whole(*_args: object) -> None:
        raise AssertionError("publish read a model whole")

    def counted_source(*args: object):
        source, head = real_source(*args)
        return Counted(source, counter), head

    monkeypatch.setattr(publish_stage, "load_base", whole)
    monkeypatch.setattr(publish_stage, "open_task_vector", whole)
    monkeypatch.setattr(
        publish_stage, "SafetensorsReader", lambda p: Counted(real_reader(p), counter)
    )
    monkeypatch.setattr(publish_stage, "open_task_source", counted_source)
    job = publish_job(tmp_path, tasks, CANDIDATES[1], mode)  # ties: three passes over the inputs
    published(job, tmp_path)
    tensors = len(read_base_model(open_store(job.store["uri"]), "base"))
    assert counter["reads"] >= tensors * tasks * 3
    assert counter["peak"] <= tasks + 1  # one tensor of θ0 and of each τ_t, never a model


def test_the_driver_logs_a_model_whose_weights_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLflow model names the stored files: logging it reads no tensor file (the store
    refuses them to the driver here) and copies none; loading it serves the stored merge."""
    import mlflow

    from pipelines.run.publish import SERVING_CODE, logged_model_dir
    from pipelines.spec.refs import MergedModelRef
    from storage.objectstore import FsspecStore
    from storage.tracking import MlflowTracker

    job = publish_job(tmp_path, 2, CANDIDATES[0], "standard")
    stored = MergedModelRef.from_artifact("m", "run-1", publish_stage.merge_and_store_job(job))
    store = open_store(job.store["uri"])
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/tracking/mlflow.db", "mergeline-unit")

    real_get, real_download = FsspecStore.get, FsspecStore.download

    def refused(key: str) -> None:
        if key.endswith(".safetensors"):
            raise AssertionError(f"the driver read {key}")

    with monkeypatch.context() as driver:
        driver.setattr(FsspecStore, "get", lambda s, key: refused(key) or real_get(s, key))
        driver.setattr(
            FsspecStore, "download", lambda s, key, t: refused(key) or real_download(s, key, t)
        )
        driver.setattr(FsspecStore, "local_path", lambda s, key: None)  # as a remote store
        with (
            tracker.pipeline_run("run-1", {}),
            logged_model_dir(store, job.store, stored) as d,
        ):
            tracker.publish(
                str(d),
                str(SERVING_CODE),
                "m",
                {},
                ["candidate"],
                {},
                serving=(64, {"task": "perm0"}),
            )
    logged = list((tmp_path / "tracking" / "mlartifacts").rglob("*"))
    assert any(p.name == "stored_model.json" for p in logged)
    assert not [p for p in logged if p.suffix == ".safetensors"]  # MLflow holds no weights

    mlflow.set_tracking_uri(tracker.uri)
    try:
        served = mlflow.pyfunc.load_model("models:/m@candidate")
    finally:
        mlflow.set_tracking_uri(None)
    x = torch.randn(5, 64).numpy()
    expected = MergedPredictor(tmp_path / "store" / stored.prefix).predict(x, "perm1")
    assert (served.predict(x, params={"task": "perm1"}) == expected).all()

"""A store that loses an artifact while a run uses it is a storage failure (exit 1, naming the
artifact), not a user error with advice to skip the task."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from storage.artifacts import read_file, write_artifact
from storage.errors import ArtifactError, MergelineError, SystemFailure
from storage.objectstore import open_store

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def _read_delta(uri: str, prefix: str) -> int:
    return len(read_file(open_store(uri), prefix, "delta.safetensors"))


def test_an_artifact_wiped_during_a_run_fails_the_stage_as_storage(tmp_path: Path) -> None:
    import ray

    from pipelines.run.raysession import get

    store = open_store(f"file://{tmp_path}/store")
    write_artifact(store, "task-vectors/k1", {"delta.safetensors": b"0" * 64}, {})
    job = ray.remote(_read_delta).options(num_cpus=0.5)
    assert get(job.remote(store.uri, "task-vectors/k1"), "fine-tune 't1'") == 64
    shutil.rmtree(tmp_path / "store" / "task-vectors" / "k1")  # the store is wiped mid-run
    with pytest.raises(SystemFailure) as caught:
        get(job.remote(store.uri, "task-vectors/k1"), "fine-tune 't1'")
    assert not isinstance(caught.value, MergelineError) and caught.value.exit_code == 1
    message = str(caught.value)
    assert f"{store.uri}/task-vectors/k1/manifest.json" in message
    assert "fine-tune 't1'" in message and "skip" not in message


def test_a_missing_artifact_outside_a_run_stays_a_user_error(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    with pytest.raises(ArtifactError, match="does not exist"):
        read_file(store, "task-vectors/nothing", "delta.safetensors")

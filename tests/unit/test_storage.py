"""The object store and manifest-last artifacts on a local filesystem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from storage.artifacts import find_artifact, read_file, write_artifact
from storage.digest import digest_state
from storage.errors import ArtifactError
from storage.objectstore import open_store
from storage.taskvectors import find_task_vector, read_task_vector, write_task_vector


@pytest.fixture
def store(tmp_path: Path):
    return open_store(f"file://{tmp_path}/store")


def test_task_vector_round_trip(store) -> None:
    delta = {"layers.0.weight": torch.randn(3, 4), "layers.0.bias": torch.randn(3)}
    head = {"weight": torch.randn(2, 3), "bias": torch.zeros(2)}
    ref = write_task_vector(store, "k1", delta, head, {"task": "a"})
    found = find_task_vector(store, "k1")
    assert found is not None and found.sha256 == ref.sha256 and found.meta == {"task": "a"}
    got_delta, got_head = read_task_vector(store, "k1")
    assert digest_state(got_delta) == digest_state(delta)
    assert torch.equal(got_head["weight"], head["weight"])


def test_a_directory_without_manifest_does_not_exist(store, tmp_path: Path) -> None:
    write_task_vector(
        store, "k2", {"w": torch.ones(2)}, {"weight": torch.ones(1, 2), "bias": torch.ones(1)}, {}
    )
    (tmp_path / "store/task-vectors/k2/manifest.json").unlink()
    assert find_task_vector(store, "k2") is None
    (tmp_path / "store/task-vectors/k3").mkdir(parents=True)
    (tmp_path / "store/task-vectors/k3/manifest.json").write_text("{not json")
    assert find_task_vector(store, "k3") is None


def test_a_corrupted_file_is_refused_naming_it(store, tmp_path: Path) -> None:
    write_artifact(store, "a/b", {"x.bin": b"hello world"}, {})
    (tmp_path / "store/a/b/x.bin").write_bytes(b"hello w0rld")
    with pytest.raises(ArtifactError, match=r"x\.bin.*checksum"):
        read_file(store, "a/b", "x.bin")


def test_manifest_is_written_last_and_lists_every_file(store, tmp_path: Path) -> None:
    write_artifact(store, "m", {"a": b"1", "b": b"22"}, {"k": 1})
    manifest = json.loads((tmp_path / "store/m/manifest.json").read_text())
    assert set(manifest["files"]) == {"a", "b"}
    assert manifest["files"]["b"]["size"] == 2
    files = sorted((tmp_path / "store/m").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert files[-1].name == "manifest.json"
    assert not list((tmp_path / "store/m").glob("*.partial"))


def test_truncated_safetensors_is_an_artifact_error(store, tmp_path: Path) -> None:
    write_task_vector(
        store, "k4", {"w": torch.ones(2)}, {"weight": torch.ones(1, 2), "bias": torch.ones(1)}, {}
    )
    find_artifact(store, "task-vectors/k4")
    path = tmp_path / "store/task-vectors/k4/delta.safetensors"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(ArtifactError, match="checksum"):
        read_task_vector(store, "k4")


def test_digest_covers_scalars_and_is_value_sensitive() -> None:
    a = digest_state({"scale": torch.tensor(1.5), "w": torch.ones(2)})
    assert a == digest_state({"scale": torch.tensor(1.5), "w": torch.ones(2)})
    assert a != digest_state({"scale": torch.tensor(2.5), "w": torch.ones(2)})


def test_copying_an_artifact_keeps_its_sub_folders_and_checks_every_file(
    store, tmp_path: Path
) -> None:
    from storage.localfiles import copy_artifact

    files = {"model.safetensors": b"w", "transformers/config.json": b"{}", "a/b/c.txt": b"c"}
    write_artifact(store, "models/m/r1", files, {})
    copied = copy_artifact(store, "models/m/r1", tmp_path / "all")
    assert {p.relative_to(copied).as_posix() for p in copied.rglob("*") if p.is_file()} == {
        *files,
        "manifest.json",
    }
    assert (copied / "a/b/c.txt").read_bytes() == b"c"
    only = copy_artifact(store, "models/m/r1", tmp_path / "hf", folder="transformers")
    assert [p.name for p in only.iterdir()] == ["config.json"]

    (tmp_path / "store/models/m/r1/a/b/c.txt").write_bytes(b"rotten")
    with pytest.raises(ArtifactError, match="a/b/c.txt: checksum mismatch"):
        copy_artifact(store, "models/m/r1", tmp_path / "again")
    assert not (tmp_path / "again").exists()  # nothing half copied is left as the directory


def test_a_manifest_name_that_leaves_the_artifact_is_refused(store, tmp_path: Path) -> None:
    from storage.localfiles import copy_artifact

    write_artifact(store, "models/m/r2", {"../../escape": b"x"}, {})
    with pytest.raises(ArtifactError, match="no relative path"):
        copy_artifact(store, "models/m/r2", tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""Model-sized files stream through the store: hashed on the way, never held as ``bytes``."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from storage.artifacts import read_manifest, read_tensor_file
from storage.errors import ArtifactError
from storage.objectstore import open_store
from storage.taskvectors import read_task_vector, task_vector_prefix, write_task_vector

HEAD = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
MiB = 1024 * 1024


def test_upload_and_download_stream_and_hash(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(9 * MiB + 5))  # more than two chunks, not a multiple
    expected = (hashlib.sha256(source.read_bytes()).hexdigest(), source.stat().st_size)

    assert store.upload("a/b.bin", source) == expected
    assert (tmp_path / "store/a/b.bin").read_bytes() == source.read_bytes()
    assert store.download("a/b.bin", None) == expected
    assert store.download("a/b.bin", tmp_path / "copy/b.bin") == expected
    assert (tmp_path / "copy/b.bin").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["b.bin"]  # no partials
    with pytest.raises(FileNotFoundError):
        store.download("a/missing.bin", tmp_path / "copy/missing.bin")
    assert not (tmp_path / "copy/missing.bin").exists()


def test_stored_tensor_files_and_manifests_are_those_of_the_bytes_format(tmp_path: Path) -> None:
    """Same keys, same bytes, same sha256 as when files were built with safetensors' save()."""
    store = open_store(f"file://{tmp_path}")
    delta = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.int64)}
    write_task_vector(store, "k", delta, HEAD, {"task": "t"})
    folder = tmp_path / task_vector_prefix("k")
    assert sorted(p.name for p in folder.iterdir()) == [
        "delta.safetensors",
        "head.safetensors",
        "manifest.json",
    ]
    files = read_manifest(store, task_vector_prefix("k"))["files"]
    for name, tensors in {"delta.safetensors": delta, "head.safetensors": HEAD}.items():
        assert (folder / name).read_bytes() == save(tensors)
        assert files[name] == {
            "sha256": hashlib.sha256(save(tensors)).hexdigest(),
            "size": len(save(tensors)),
        }


def test_a_corrupt_tensor_file_is_refused_with_one_line_naming_it(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    write_task_vector(store, "k", {"w": torch.ones(64, 64)}, HEAD, {"task": "t"})
    path = tmp_path / task_vector_prefix("k") / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one value changed
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as error:
        read_tensor_file(store, task_vector_prefix("k"), "delta.safetensors")
    message = str(error.value)
    assert "\n" not in message and "checksum mismatch" in message
    assert message.startswith(store.url(f"{task_vector_prefix('k')}/delta.safetensors"))


def test_a_model_sized_file_is_never_built_as_bytes(tmp_path: Path) -> None:
    """Writing and reading a 64 MB task vector allocates far less than 64 MB of Python objects
    (torch's own storage is not traced: what is measured is every bytes copy of the file)."""
    store = open_store(f"file://{tmp_path}")
    delta = {"w": torch.ones(16 * MiB, dtype=torch.float32)}  # 64 MB
    tracemalloc.start()
    try:
        write_task_vector(store, "k", delta, HEAD, {"task": "t"})
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        read, _ = read_task_vector(store, "k")
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(read["w"], delta["w"])
    assert write_peak < 16 * MiB, f"writing held {write_peak / MiB:.0f} MB of Python objects"
    assert read_peak < 16 * MiB, f"reading held {read_peak / MiB:.0f} MB of Python objects"

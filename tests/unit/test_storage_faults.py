"""A write that fails part-way (disk full, permission denied) leaves no manifest behind: the
partial artifact stays invisible. The failures are real OS errors, not mocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from storage.objectstore import open_store
from storage.taskvectors import find_task_vector
from tests.conftest import REPO

# Runs in a child process whose file-size limit is 200 kB: writing the 4 MB delta fails with
# EFBIG exactly as a full disk fails a write (SIGXFSZ ignored so the write returns an error).
WRITER = """
import resource, signal, sys, torch
from storage.objectstore import open_store
from storage.taskvectors import write_task_vector
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
store = open_store(sys.argv[1])
head = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
try:
    write_task_vector(store, "k", {"w": torch.ones(1024, 1024)}, head, {"task": "t"})
except Exception as error:  # the store reports the OS error (EFBIG) in its own words
    print("failed:", type(error).__name__, error)
    sys.exit(3)
"""


def test_a_write_that_runs_out_of_space_leaves_no_visible_artifact(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store"
    result = subprocess.run(
        [sys.executable, "-c", WRITER, uri], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "File too large" in result.stdout and "delta.safetensors" in result.stdout
    assert find_task_vector(open_store(uri), "k") is None
    assert not list((tmp_path / "store").rglob("manifest.json"))
    assert not list((tmp_path / "store").rglob("delta.safetensors"))  # no torn file either


def test_a_permission_error_mid_artifact_leaves_no_manifest(tmp_path: Path) -> None:
    from storage.taskvectors import write_task_vector

    store = open_store(f"file://{tmp_path}/store")
    # The head's final path is taken by a directory: the second file's write fails for real.
    (tmp_path / "store/task-vectors/k/head.safetensors").mkdir(parents=True)
    head = {"weight": __import__("torch").ones(2, 4), "bias": __import__("torch").zeros(2)}
    try:
        write_task_vector(store, "k", {"w": __import__("torch").ones(3)}, head, {})
    except Exception as error:  # noqa: BLE001 - any OS-level failure is acceptable here
        assert isinstance(error, OSError) or "head.safetensors" in str(error)
    else:
        raise AssertionError("writing over a directory should fail")
    assert find_task_vector(store, "k") is None
    assert not (tmp_path / "store/task-vectors/k/manifest.json").exists()

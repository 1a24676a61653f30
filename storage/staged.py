"""Artifact files given by what produces them, so that a model-sized file is never ``bytes``.

:func:`storage.artifacts.write_artifact` takes, per file name, ``bytes`` (small files: JSON,
tokenizers), a :class:`TensorFile` (saved with safetensors' ``save_file`` to a local scratch
file) or a :class:`LocalFile` (a file already on disk); the last two stream to the store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class TensorFile:
    """The content of a safetensors file, given as its tensors."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] | None = None

    def save(self, path: str | Path) -> None:
        """Write the file; its bytes are exactly those of ``storage.tensors.tensors_to_bytes``."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(path), metadata=self.metadata)


@dataclass(frozen=True, eq=False)
class LocalFile:
    """A file on local disk, uploaded as it is. ``owner`` keeps the scratch directory that
    holds it alive (see :class:`ScratchDirectory`)."""

    path: Path
    owner: object = None


ArtifactFile = bytes | TensorFile | LocalFile  # one file of an artifact, as it is written


class ScratchDirectory:
    """A temporary directory removed once this object and every :class:`LocalFile` naming it
    as ``owner`` are gone: for files handed on to be written by someone else."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        weakref.finalize(self, shutil.rmtree, self.path, True)

    @classmethod
    def of_this_process(cls, prefix: str) -> ScratchDirectory:
        """A scratch directory named with this process's id (``<prefix><pid>-…``), after
        removing those of the same prefix whose process is gone: a process killed without
        running its finalizers (a Ray actor ends so) leaves its directory to the next one."""
        for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
            owner = stale.name.removeprefix(prefix).split("-", 1)[0]
            if owner.isdigit() and not _alive(int(owner)):
                shutil.rmtree(stale, ignore_errors=True)
        return cls(f"{prefix}{os.getpid()}-")

    def file(self, relative: str | Path) -> LocalFile:
        return LocalFile(self.path / relative, self)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True

"""Checks of the local paths a command writes to, made before the command does any work.

A path that cannot be written (a directory where a file is wanted, a file where a directory
is wanted, a parent that is a file or read-only) is the user's to fix: it fails at once with
one line naming the option, never after fine-tuning and publishing.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage.errors import MergelineError


class OutputPathError(MergelineError):
    """An output path given on the command line cannot be written."""


def check_output_file(path: Path, option: str) -> None:
    """``path`` can be written as a file: it is one already or does not exist, and its
    nearest existing ancestor is a writable directory."""
    if path.is_dir():
        raise OutputPathError(
            f"{option} {path} is a directory: name a file in it, e.g. {path / 'summary.json'}"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path} exists and is read-only: name a writable file")
    _check_parent(path, option)


def check_output_directory(path: Path, option: str) -> None:
    """``path`` can hold new files: it is a directory already or can be made one."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(
            f"{option} {path} is a file: name a directory (it receives index.html and the PNGs)"
        )
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {path} is read-only: name a writable directory")
        return
    _check_parent(path, option)


def _check_parent(path: Path, option: str) -> None:
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(
            f"{option} {path}: {ancestor} is a file, not a directory: choose another path"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: {ancestor} is read-only: choose another path")

"""A real tensor reader wrapped to count its reads and the tensors it handed out that are alive
at once (the memory-bound tests of the scorer and of publish)."""

from __future__ import annotations

import weakref
from typing import Any

import torch


class Counted:
    """Counts ``reads`` and, in ``alive``/``peak``, the tensors a read returned that are still
    alive; a read into a caller's buffer (``out=``) holds nothing new."""

    def __init__(self, reader: Any, counter: dict[str, int]) -> None:
        self.reader, self.counter, self.tensors = reader, counter, reader.tensors

    def names(self) -> list[str]:
        return self.reader.names()

    def _released(self) -> None:
        self.counter["alive"] -= 1

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self.reader.read(name, out=out)
        self.counter["reads"] += 1
        if out is None:
            self.counter["alive"] += 1
            self.counter["peak"] = max(self.counter["peak"], self.counter["alive"])
            weakref.finalize(tensor, self._released)
        return tensor

    def close(self) -> None:
        self.reader.close()

"""The task-kind protocol and its registry (one kind per file in ``workers/kinds/``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from storage.errors import ModelError
from storage.shards import SafetensorsReader, TensorView
from storage.staged import ArtifactFile

TRANSFORMERS = "transformers"  # the folder of a published merge that transformers loads
#: outputs of the trainable model for a batch of inputs: features (classification) or logits
Forward = Callable[[Tensor], Tensor]
Head = dict[str, Tensor]
#: a merged backbone on local disk, read tensor by tensor (what a kind's ``export`` copies)
MergedWeights = SafetensorsReader | TensorView


class TaskKind(Protocol):
    """What a stage needs to know about one kind of task."""

    name: str
    metrics: tuple[str, ...]  # what :meth:`score` computes; the first is the search's default
    report_metrics: tuple[str, ...]  # extra metrics of the final test report
    export_nonlinear: bool  # a linear-mode merge is also exported as plain θ0 + Σ α τ
    mlflow_task: str | None  # logged with MLflow's transformers flavor for this task
    hf_prefix: str  # what the pipeline's weight names put before the Hugging Face model's

    def fit_head(
        self, forward: Forward, x: np.ndarray, y: np.ndarray, num_classes: int, what: str
    ) -> Head:
        """The task's frozen head from θ0's outputs on its training split (may be empty)."""
        ...

    def key_settings(
        self, evaluation: Mapping[str, Any], dataset: Mapping[str, Any]
    ) -> dict[str, Any]:
        """What a stored task vector depends on beyond base, data and fine-tuning settings."""
        ...

    def frozen_in_linear_mode(self, network: nn.Module) -> set[str]:
        """Parameters linear-mode fine-tuning keeps at θ0 (their δ is exactly zero)."""
        ...

    def fast_path(
        self,
        network: nn.Module,
        theta0: Mapping[str, Tensor],
        task_vectors: Mapping[str, Mapping[str, Tensor]],
        heads: Mapping[str, Head],
        splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
        settings: Mapping[str, Any],
    ) -> Any:
        """The exact linear-mode fast path over one split per task: ``sources``, ``tasks``,
        ``accuracies((B, S) α) -> {task: (B,)}`` and ``accuracy_matrix((B, S) α) -> (B, T)``."""
        ...

    def trainable(self, network: nn.Module, head: Head) -> nn.Module:
        """The module an engine trains: ``network`` (θ or its linearization) and the head."""
        ...

    def loss(self, outputs: Tensor, inputs: Tensor, labels: Tensor) -> Tensor:
        """The mean training loss of a batch from the trainable module's outputs."""
        ...

    def score(
        self,
        forward: Forward,
        head: Head,
        x: np.ndarray,
        y: np.ndarray,
        metric: str,
        settings: Mapping[str, Any],
    ) -> float:
        """``metric`` of the model ``forward`` (under ``head``) on one split; higher is better
        except ``nll``. ``settings`` is the spec's ``evaluation`` section."""
        ...


@dataclass(frozen=True)
class Pretrained:
    """A Hugging Face base as a kind loads it: the network at θ0, the config and tokenizer
    files that rebuild it (file name -> bytes), and the digest its task vectors record."""

    network: nn.Module
    files: dict[str, bytes]
    digest: str


class HFKind(Protocol):
    """What a kind adds for Hugging Face bases (``base_model.source: hf``)."""

    def load_pretrained(self, directory: Path, config: Mapping[str, Any]) -> Pretrained:
        """The base from the resolved model directory (or its GGUF file)."""
        ...

    def from_files(
        self, directory: Path, state: Mapping[str, Tensor] | None, config: Mapping[str, Any]
    ) -> nn.Module:
        """The network from stored config files and a state (θ0 or merged); with ``state``
        None, the architecture only, its weights to be filled by the caller."""
        ...

    def encode(
        self, x: np.ndarray, tokenizer: Any, max_length: int, dataset: Mapping[str, Any], what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw inputs of one split -> the network's int64 inputs, and the kept rows' indices."""
        ...

    def export(
        self,
        directory: Path,
        merged: MergedWeights | None,
        heads: Mapping[str, Head],
        config: Mapping[str, Any],
    ) -> dict[str, ArtifactFile]:
        """The published files beside a merge: a transformers directory and what serves it.
        ``merged`` reads the merged backbone (pipeline names) from local disk, one tensor at a
        time; None where no plain transformers model computes the merge."""
        ...


KINDS: dict[str, TaskKind] = {}
_PACKAGE = Path(__file__).parent
_FILES = tuple(
    sorted(p.stem for p in _PACKAGE.glob("*.py") if p.stem not in ("__init__", "registry"))
)


def register_kind(kind: TaskKind) -> TaskKind:
    """Register ``kind`` under its name, which must be its file's name (once)."""
    module = type(kind).__module__.rsplit(".", 1)[-1]
    if kind.name != module:
        raise RuntimeError(f"task kind {kind.name!r} must live in workers/kinds/{kind.name}.py")
    if kind.name in KINDS:
        raise RuntimeError(f"task kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> TaskKind:
    """The registered kind ``name`` (every file of the package is imported when a name is not
    registered yet: one kind's module imported directly registers that kind only)."""
    if name not in KINDS:
        for stem in _FILES:
            importlib.import_module(f"workers.kinds.{stem}")
    if name not in KINDS:
        raise ModelError(f"base_model.kind: unknown {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def known_kinds() -> tuple[str, ...]:
    """Every kind's name (the file names of this package)."""
    return _FILES


@torch.no_grad()
def batched(forward: Forward, x: np.ndarray, batch_size: int) -> Tensor:
    """``forward`` over ``x`` in batches of ``batch_size`` rows, concatenated."""
    inputs = torch.as_tensor(x)
    size = max(int(batch_size), 1)
    if len(inputs) <= size:  # one pass (also an empty split)
        return forward(inputs)
    return torch.cat([forward(inputs[i : i + size]) for i in range(0, len(inputs), size)])

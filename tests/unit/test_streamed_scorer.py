"""A scorer merges each candidate tensor by tensor from θ0's and the task vectors' files into
the one model it holds: the same scores as a merge in memory, and never more than one tensor
of each input alive at once, whatever the number of tasks (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.spec.plan import Candidate
from pipelines.stages.search import CandidateScorer
from storage.objectstore import open_store
from storage.taskvectors import write_base_model, write_task_vector
from tests.conftest import REPO
from tests.counting import Counted
from workers.kinds import get_kind
from workers.merge import merge
from workers.models import build_backbone
from workers.search.evaluate import at_state

BASE = {"source": "builtin", "name": "mlp", "hidden": [48], "features": 16, "seed": 0}
DIGITS = {"source": "sklearn", "name": "digits", "pool": "tasks"}
EVALUATION = {"val_fraction": 0.2, "val_max": 5000, "split_seed": 0, "metric": None}


def stored_inputs(tmp_path: Path, tasks: int) -> tuple[dict, dict, dict]:
    store_cfg = {"uri": f"file://{tmp_path}/store"}
    store = open_store(store_cfg["uri"])
    theta0 = {k: v.clone() for k, v in build_backbone(BASE, 64).state_dict().items()}
    meta = {"kind": "base_model", "config": BASE, "input_dim": 64}
    write_base_model(store, "base", theta0, meta)
    generator = torch.Generator().manual_seed(3)
    specs = {}
    for index in range(tasks):
        name = f"perm{index}"
        delta = {k: 0.3 * torch.randn(v.shape, generator=generator) for k, v in theta0.items()}
        head = {
            "weight": torch.randn(10, 16, generator=generator),
            "bias": torch.zeros(10),
        }
        write_task_vector(store, name, delta, head, {"task": name})
        dataset = DIGITS | {"transform": {"kind": "permute", "seed": index + 1}}
        specs[name] = {"key": name, "dataset": dataset}
    return store_cfg, meta, specs


CANDIDATES = [
    Candidate("task_arithmetic", {}, 0.4),
    Candidate("ties", {"density": 0.3}, 0.9),
    Candidate("tsv", {}, 0.7),
]


def test_streamed_scores_equal_a_merge_in_memory(tmp_path: Path) -> None:
    store_cfg, meta, tasks = stored_inputs(tmp_path, 3)
    scorer = CandidateScorer(store_cfg, "base", meta, tasks, EVALUATION)
    scores = scorer.score(CANDIDATES)
    inputs = scorer.inputs
    assert inputs._dense is None  # no state dict of θ0 or of a task vector was made

    store = open_store(store_cfg["uri"])
    from storage.taskvectors import read_base_model, read_task_vector

    theta0 = read_base_model(store, "base")
    vectors = {name: read_task_vector(store, name)[0] for name in tasks}
    backbone = build_backbone(BASE, 64)
    kind = get_kind("classification")
    for candidate, score in zip(CANDIDATES, scores, strict=True):
        state = merge(candidate.method, theta0, vectors, candidate.coefficient, **candidate.params)
        for name in tasks:
            x, y = inputs.data(name, "val", None, 0)
            expected = kind.score(
                at_state(backbone, state), inputs.heads[name], x, y, "accuracy", inputs.settings
            )
            assert score["accuracy"][name] == pytest.approx(expected, abs=1e-12), candidate.id


@pytest.mark.parametrize("tasks", [2, 6])
def test_a_scorer_holds_one_tensor_of_each_input_at_most(tmp_path: Path, tasks: int) -> None:
    store_cfg, meta, specs = stored_inputs(tmp_path, tasks)
    scorer = CandidateScorer(store_cfg, "base", meta, specs, EVALUATION)
    counter = {"alive": 0, "peak": 0, "reads": 0}
    inputs = scorer.inputs
    inputs.base_reader = Counted(inputs.base_reader, counter)
    inputs.sources = {task: Counted(source, counter) for task, source in inputs.sources.items()}
    scorer.score(CANDIDATES[1:2])  # ties with a global trim: three passes over every input
    tensors = len(inputs.base_reader.names())
    assert counter["reads"] >= tensors * (tasks + 1)
    assert counter["peak"] <= tasks + 1  # one tensor of θ0 and of each τ_t, never a model
    assert inputs._dense is None


def test_a_coefficient_grid_merges_the_task_vectors_once_per_method_and_params(
    tmp_path: Path,
) -> None:
    store_cfg, meta, specs = stored_inputs(tmp_path, 3)
    scorer = CandidateScorer(store_cfg, "base", meta, specs, EVALUATION)
    counter = {"alive": 0, "peak": 0, "reads": 0}
    inputs = scorer.inputs
    inputs.sources = {task: Counted(source, counter) for task, source in inputs.sources.items()}
    tensors = len(inputs.base_reader.names())
    grid = [Candidate("tsv", {}, lam) for lam in (0.3, 0.6, 0.9, 1.2)]
    scorer.score(grid)
    assert counter["reads"] == 3 * tensors  # each τ_t once, not once per λ
    scorer.score([Candidate("tsv", {"fraction": 0.5}, 0.3)])  # other params: a new Δ
    assert counter["reads"] == 2 * 3 * tensors
    scorer.score([Candidate("tsv", {}, {"perm0": 0.2, "perm1": 0.4, "perm2": 0.6})])
    assert counter["reads"] == 3 * 3 * tensors  # per-task coefficients merge as they are


def test_a_scratch_directory_of_a_killed_process_is_removed_by_the_next(tmp_path: Path) -> None:
    import subprocess
    import sys

    from storage.staged import ScratchDirectory

    code = (
        "import os, sys; from storage.staged import ScratchDirectory;"
        "d = ScratchDirectory.of_this_process('mergeline-test-scratch-');"
        "(d.path / 'delta').write_bytes(b'x'); print(d.path, flush=True); os._exit(0)"
    )  # os._exit: no finalizer runs, as when Ray kills an actor
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    left = Path(done.stdout.strip())
    assert (left / "delta").is_file()
    mine = ScratchDirectory.of_this_process("mergeline-test-scratch-")
    assert not left.exists() and mine.path.is_dir()

"""The classification kind computes features in bounded passes, with the whole split's result."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from tests.conftest import REPO
from workers.kinds import get_kind
from workers.kinds.classification import ROWS_PER_PASS


def _recording_network(sizes: list[int]):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh())

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        sizes.append(len(inputs))
        return network(inputs)

    return network, forward


def test_a_split_larger_than_one_pass_is_scored_in_passes_with_the_whole_splits_accuracy() -> None:
    kind = get_kind("classification")
    rows = 2 * ROWS_PER_PASS + 452
    x = np.random.default_rng(0).normal(size=(rows, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, size=rows)
    sizes: list[int] = []
    network, forward = _recording_network(sizes)
    head = kind.fit_head(forward, x[:300], y[:300], 3, "task 't'")
    assert sizes == [300]  # a split of at most ROWS_PER_PASS rows is one pass, as before
    sizes.clear()
    accuracy = kind.score(forward, head, x, y, "accuracy", {})
    assert sizes == [ROWS_PER_PASS, ROWS_PER_PASS, 452]
    with torch.no_grad():  # the same accuracy as one pass over every row
        from workers.models.heads import apply_head

        whole = apply_head(head, network(torch.as_tensor(x))).argmax(dim=1)
    assert accuracy == int((whole == torch.as_tensor(y)).sum()) / rows
    assert kind.score(forward, head, x[:0], y[:0], "accuracy", {}) == 0.0  # an empty split


def test_a_kind_module_imported_first_leaves_the_other_kinds_findable() -> None:
    """Importing one kind's module registers that kind only; get_kind still finds the others
    (a fresh interpreter, so that no other test has filled the registry)."""
    code = (
        "import workers.kinds.classification\n"
        "from workers.kinds import get_kind\n"
        "print(get_kind('causal_lm').name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "causal_lm"

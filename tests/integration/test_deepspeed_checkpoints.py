"""Checkpoints of multi-worker DeepSpeed fine-tunes (ZeRO-2 and ZeRO-3) on CPU: each rank writes
its own part, and a run resumes from them on another number of workers exactly.

The ranks are processes of their own (:mod:`tests.distributed`), without Ray; the stage's
checkpoint functions write and read them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import CONFIG, KEY, STOP_AT, data, model, run_ranks
from workers.finetune.engine import TorchEngine
from workers.finetune.loop import fit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _expected() -> dict[str, torch.Tensor]:
    """The uninterrupted run, in the plain loop (DeepSpeed on any layout matches it)."""
    plain = TorchEngine(model(), CONFIG)
    fit(plain, *data(), CONFIG, "t")
    return plain.model_state()


def _assert_same(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_checkpoint_per_rank_and_resume_on_one_or_two(
    stage: int, tmp_path: Path
) -> None:
    expected = _expected()
    uri = f"file://{tmp_path}/two"
    run_ranks(2, stage, uri, "checkpoint", tmp_path / "unused.safetensors")

    stored = tmp_path / "two" / "checkpoints" / KEY / f"step-{STOP_AT:09d}"
    names = sorted(path.name for path in stored.iterdir())
    assert names == [
        "manifest.json",
        "optimizer-rank-00000-of-00002.safetensors",
        "optimizer-rank-00001-of-00002.safetensors",
        "rng.safetensors",
        "state.json",
        "weights-rank-00000-of-00002.safetensors",
        "weights-rank-00001-of-00002.safetensors",
    ]
    assert set(json.loads((stored / "manifest.json").read_bytes())["files"]) == set(names) - {
        "manifest.json"
    }
    index = json.loads((stored / "state.json").read_bytes())
    assert index["world_size"] == 2 and index["step"] == STOP_AT
    total = sum(math.prod(shape) for shape in index["shapes"].values())
    held = []
    for rank, ranges in enumerate(index["ranges"]):
        weights = load_file(stored / f"weights-rank-{rank:05d}-of-00002.safetensors")
        optimizer = load_file(stored / f"optimizer-rank-{rank:05d}-of-00002.safetensors")
        mine = {name: (a, b) for name, (a, b) in ranges.items() if b > a}
        assert set(weights) == set(mine)  # a rank's files hold exactly the ranges it names
        assert set(optimizer) == {f"{n}/{k}" for n in mine for k in ("exp_avg", "exp_avg_sq")}
        for name, (a, b) in mine.items():
            assert weights[name].numel() == optimizer[f"{name}/exp_avg"].numel() == b - a
        held.append(sum(b - a for a, b in mine.values()))
    # Disjoint ranges that add up to the model: no rank wrote (or held) all of the state.
    assert sum(held) == total and all(0 < count < total for count in held)
    for name, shape in index["shapes"].items():
        spans = sorted(tuple(r[name]) for r in index["ranges"] if r[name][1] > r[name][0])
        assert spans[0][0] == 0 and spans[-1][1] == math.prod(shape)
        assert all(left[1] == right[0] for left, right in zip(spans, spans[1:], strict=False))

    for workers in (1, 2):  # the checkpoint stays until a task vector replaces it
        out = tmp_path / f"resumed-on-{workers}.safetensors"
        run_ranks(workers, stage, uri, "resume", out)
        _assert_same(load_file(out), expected)

    # And the other way: saved by one worker, resumed on two.
    one = f"file://{tmp_path}/one"
    run_ranks(1, stage, one, "checkpoint", tmp_path / "unused.safetensors")
    index = json.loads(
        (tmp_path / "one" / "checkpoints" / KEY / f"step-{STOP_AT:09d}" / "state.json").read_bytes()
    )
    assert index["world_size"] == 1
    run_ranks(2, stage, one, "resume", tmp_path / "one-on-two.safetensors")
    _assert_same(load_file(tmp_path / "one-on-two.safetensors"), expected)

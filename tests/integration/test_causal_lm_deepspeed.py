"""DeepSpeed with a causal LM: integer token ids in, the completion loss, ZeRO 0-2, 2 workers.

A tiny tied Llama (``tests/lm_fixtures.py``) trains through the causal_lm kind's loss on packed
(ids, mask, completion mask) batches: DeepSpeed on CPU must match the plain torch loop at every
ZeRO stage, and two Ray Train workers must give the task vector of one with the same global
batch (the pipeline end to end, ZeRO 2).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from storage.objectstore import open_store
from storage.taskvectors import read_task_vector
from tests.integration.test_causal_lm_pipeline import _spec
from tests.integration.test_deepspeed import process_group_env  # noqa: F401  (a fixture)
from tests.lm_fixtures import tiny_llama, write_tiny_llama
from workers.finetune import TrainConfig
from workers.finetune.engine import TorchEngine
from workers.finetune.loop import fit
from workers.kinds import get_kind
from workers.models.causal_lm import CausalLM

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CONFIG = TrainConfig(steps=6, batch_size=8, lr=1e-2)


def _packed(rows: int = 32, length: int = 12) -> np.ndarray:
    """Random packed rows: ids, mask (right padding), completion mask (the last real tokens)."""
    rng = np.random.default_rng(0)
    packed = np.zeros((rows, 3, length), dtype=np.int64)
    for row in range(rows):
        real = int(rng.integers(6, length + 1))
        packed[row, 0, :real] = rng.integers(4, 40, size=real)
        packed[row, 1, :real] = 1
        packed[row, 2, real - 2 : real] = 1
    return packed


def test_deepspeed_trains_a_causal_lm_like_the_plain_loop_at_every_zero_stage(
    process_group_env: None,  # noqa: F811
) -> None:
    from workers.finetune.deepspeed_engine import DeepSpeedEngine

    loss = get_kind("causal_lm").loss
    x = _packed()
    y = np.zeros(len(x), dtype=np.int64)
    plain = TorchEngine(CausalLM(tiny_llama()), CONFIG, loss_fn=loss)
    fit(plain, x, y, CONFIG, "t")
    expected = plain.model_state()
    start = CausalLM(tiny_llama()).state_dict()
    assert any((expected[k] - start[k]).abs().max() > 1e-3 for k in expected)
    for stage in (0, 1, 2):
        engine = DeepSpeedEngine(CausalLM(tiny_llama()), CONFIG, stage, loss)
        fit(engine, x, y, CONFIG, "t")
        state = engine.model_state()
        assert set(state) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("local_ray")
def test_two_workers_give_a_causal_lm_the_task_vector_of_one(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny-llama")
    vectors = {}
    for workers in (1, 2):
        document = copy.deepcopy(_spec(tmp_path / f"run{workers}", model, "standard"))
        document["tasks"] = document["tasks"][:1]
        document["finetune"] |= {
            "steps": 6,
            "deepspeed": {"zero_stage": 2},
            "resources": {"num_cpus": 1, "num_workers": workers},
        }
        devnull = Console(file=open("/dev/null", "w"))
        summary = run_pipeline(validate_document(document), devnull, None)
        task = summary["tasks"]["sums"]
        assert task["engine"] == "deepspeed" and task["workers"] == workers
        uri = task["task_vector_uri"]
        store = open_store(uri.rsplit("/task-vectors/", 1)[0])
        vectors[workers] = read_task_vector(store, uri.rsplit("/", 1)[1])[0]
    assert any(value.abs().max() > 1e-3 for value in vectors[1].values())
    for name, value in vectors[1].items():
        torch.testing.assert_close(vectors[2][name], value, rtol=1e-4, atol=1e-5)
    assert json.dumps(sorted(vectors[1])) == json.dumps(sorted(vectors[2]))

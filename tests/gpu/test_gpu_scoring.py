"""Scoring on CUDA (``merge.resources.num_gpus``), checked against the same scoring on the CPU.

Tolerance: the forward at a merged state within 1e-4 (absolute and relative) of the CPU's; a
search chooses the same candidate as the CPU run, with its validation objective within one
row of a task's split (the tiny spec's 75 validation rows: 1/75) of the CPU's (GPU kernels
round differently, which may flip one near-tie prediction).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from workers.models.weights import write_weights
from workers.search.evaluate import at_state, forward_on

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_the_forward_at_a_merged_state_on_cuda_matches_the_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    state = {name: tensor * 1.1 for name, tensor in model.state_dict().items()}
    x = torch.randn(256, 64)
    on_cpu = at_state(model, state)(x)
    cuda = torch.device("cuda")
    on_device = copy.deepcopy(model).to(cuda)
    write_weights(on_device, state.items())
    on_gpu = forward_on(on_device, cuda)(x)
    assert on_gpu.device.type == "cpu"  # outputs come back to the host
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("local_ray")
def test_a_search_on_a_gpu_scorer_chooses_what_the_cpu_chooses(
    tiny_spec: dict, tmp_path: Path
) -> None:
    def run(document: dict, name: str) -> dict:
        console = Console(file=open("/dev/null", "w"))
        return run_pipeline(validate_document(document), console, tmp_path / name)

    on_cpu = run(tiny_spec, "cpu.json")
    gpu_spec = copy.deepcopy(tiny_spec)
    gpu_spec["merge"] = gpu_spec.get("merge", {}) | {"resources": {"num_gpus": 1}}
    on_gpu = run(gpu_spec, "gpu.json")
    assert on_gpu["search"]["scores_computed"] > 0  # a GPU score is not a CPU score
    for key in ("method", "params", "coefficients"):
        assert on_gpu["best"][key] == on_cpu["best"][key]
    for name, value in on_cpu["best"]["val"].items():
        assert abs(on_gpu["best"]["val"][name] - value) <= 1 / 75 + 1e-9, name

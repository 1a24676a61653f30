"""The causal-LM example on a GPU: DeepSpeed ZeRO-2 in bf16 and a search on a GPU scorer,
checked against the same example on the CPU (torch engine, fp32, CPU scorers).

Tolerance: bf16 training moves the task vectors, so the runs are compared by what they measure,
not bit for bit. Each task's fine-tuned test token accuracy, and the chosen merge's mean
validation token accuracy, within 0.05 of the CPU run's; and both runs beat zero-shot (the
e2e test's check).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_lm_example import _run, workdir  # noqa: F401  (the example's fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.slow]
GPU = [
    "finetune.deepspeed.zero_stage=2",
    "finetune.precision=bf16",
    "finetune.resources.num_gpus=1",
    "merge.resources.num_gpus=1",
]
TOLERANCE = 0.05


def test_the_example_on_a_gpu_with_zero2_and_bf16_measures_what_the_cpu_run_does(
    workdir: Path,  # noqa: F811
) -> None:
    on_cpu = _run(workdir, "storage.uri=file://.mergeline/store-cpu")
    on_gpu = _run(workdir, "storage.uri=file://.mergeline/store-gpu", *GPU)
    for name, task in on_gpu["tasks"].items():
        assert task["engine"] == "deepspeed" and task["cache_hit"] is False
        expected = on_cpu["tasks"][name]["finetuned"]["test"]
        assert abs(task["finetuned"]["test"] - expected) <= TOLERANCE, name
    merged = on_gpu["best"]["val"]["mean_accuracy"]
    assert abs(merged - on_cpu["best"]["val"]["mean_accuracy"]) <= TOLERANCE

"""Scorers on the device ``merge.resources`` gives them: the spec's checks and the guard of a
machine without CUDA (the GPU tier, ``tests/gpu``, scores on CUDA)."""

from __future__ import annotations

import pytest
import torch

from pipelines.spec.load import apply_overrides, validate_document
from storage.errors import ModelError, SpecError
from tests.conftest import TINY_SPEC


def test_a_tangent_space_search_on_a_gpu_scorer_is_refused_before_any_work() -> None:
    linear = ["finetune.mode=linear", "merge.resources.num_gpus=1"]
    with pytest.raises(SpecError, match="merge.resources.num_gpus: the tangent-space search"):
        validate_document(apply_overrides(TINY_SPEC, linear))
    validate_document(apply_overrides(TINY_SPEC, ["merge.resources.num_gpus=1"]))  # standard


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for machines without CUDA")
def test_a_scorer_given_a_gpu_that_torch_cannot_see_says_so_in_one_line() -> None:
    from pipelines.stages.search import CandidateScorer

    with pytest.raises(ModelError) as caught:
        CandidateScorer({}, "key", {}, {}, {}, device="cuda")
    assert "merge.resources.num_gpus" in str(caught.value) and "\n" not in str(caught.value)

"""Every resource request of a plan is checked against what a local Ray has (pure: no Ray)."""

from __future__ import annotations

import pytest

from pipelines.run.resources import ResourceRequestError, check_requests, plan_requests
from pipelines.spec.load import apply_overrides, validate_document
from pipelines.spec.plan import make_plan
from tests.conftest import TINY_SPEC

TWO_CPUS = {"CPU": 2.0, "memory": 8e9}


def _requests(*overrides: str):
    return plan_requests(make_plan(validate_document(apply_overrides(TINY_SPEC, list(overrides)))))


def test_requests_the_local_ray_can_hold_pass() -> None:
    check_requests(_requests(), TWO_CPUS)
    check_requests(_requests("finetune.resources.num_cpus=2"), TWO_CPUS)
    check_requests(_requests("finetune.resources.num_gpus=0.5"), TWO_CPUS | {"GPU": 1.0})
    workers = ("finetune.resources.num_workers=2", "finetune.deepspeed.zero_stage=0")
    check_requests(_requests(*workers), TWO_CPUS)


@pytest.mark.parametrize(
    ("overrides", "available", "field"),
    [
        (["finetune.resources.num_cpus=4"], TWO_CPUS, "finetune.resources.num_cpus 4 "),
        (["finetune.resources.num_cpus=2.5"], TWO_CPUS, "finetune.resources.num_cpus 2.5 "),
        (["finetune.resources.num_gpus=1"], TWO_CPUS, "finetune.resources.num_gpus 1 "),
        (["finetune.resources.num_gpus=2"], TWO_CPUS | {"GPU": 1.0}, "num_gpus 2 "),
        (
            [
                "finetune.resources.num_workers=2",
                "finetune.resources.num_cpus=1.5",
                "finetune.deepspeed.zero_stage=0",
            ],
            TWO_CPUS,
            "finetune.resources.num_workers 2 × num_cpus 1.5 needs 3 CPUs",
        ),
        ([], {"CPU": 0.5}, "finetune.resources.num_cpus 1 "),
    ],
)
def test_a_request_the_local_ray_cannot_hold_is_refused_naming_the_field(
    overrides: list[str], available: dict[str, float], field: str
) -> None:
    with pytest.raises(ResourceRequestError) as caught:
        check_requests(_requests(*overrides), available)
    message = str(caught.value)
    assert field in message and "\n" not in message


def test_search_actors_and_pretraining_are_requests_too() -> None:
    fields = [request.field for request in _requests()]
    assert fields[0] == "finetune.resources"
    assert "merge.resources" in fields
    with pytest.raises(ResourceRequestError, match="merge.resources.num_cpus 1 "):
        check_requests(_requests()[2:], {"CPU": 0.5})


def test_a_scorer_asks_for_what_merge_resources_says() -> None:
    from pipelines.run.scheduling import actor_options

    spec = apply_overrides(TINY_SPEC, ["merge.resources.num_cpus=2", "merge.resources.num_gpus=1"])
    plan = make_plan(validate_document(spec))
    assert actor_options(plan) == {"num_cpus": 2, "num_gpus": 1}
    assert actor_options(make_plan(validate_document(TINY_SPEC))) == {"num_cpus": 1}
    search = next(r for r in plan_requests(plan) if r.field == "merge.resources")
    assert search.bundle == {"CPU": 2.0, "GPU": 1.0}
    with pytest.raises(ResourceRequestError) as caught:  # a GPU scorer on a CPU-only Ray
        check_requests([search], TWO_CPUS)
    assert str(caught.value).startswith("merge.resources.num_gpus 1 is more than the local")

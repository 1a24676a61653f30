"""Resource requests against a real Ray: a local run refuses what it cannot hold, a cluster
run waits for a placement at most ``compute.placement_timeout_s``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pipelines.run.resources import (
    PlacementTimeout,
    Request,
    ResourceRequestError,
    wait_for_placement,
)
from pipelines.spec.load import apply_overrides, validate_document

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def _run(spec: dict[str, Any], *overrides: str) -> None:
    from pipelines.run.pipeline import run_pipeline

    run_pipeline(validate_document(apply_overrides(spec, list(overrides))), Console(quiet=True))


def test_placements_the_cluster_can_give_are_granted_and_released() -> None:
    workers = Request("finetune.resources", {"CPU": 1.0}, 2)
    whole = Request("merge.num_actors", {"CPU": 2.0})
    wait_for_placement([workers, whole], timeout_s=120)  # the first probe gave its CPUs back


def test_a_placement_the_cluster_never_gives_fails_naming_the_request() -> None:
    with pytest.raises(PlacementTimeout) as caught:
        wait_for_placement([Request("finetune.resources", {"CPU": 4.0})], timeout_s=1)
    assert caught.value.exit_code == 1
    assert "finetune.resources ({CPU: 4})" in str(caught.value)
    assert "compute.placement_timeout_s" in str(caught.value)


def test_a_local_run_refuses_more_cpus_than_its_ray_has(tiny_spec: dict, tmp_path: Path) -> None:
    with pytest.raises(ResourceRequestError, match="finetune.resources.num_cpus 4 "):
        _run(tiny_spec, "finetune.resources.num_cpus=4")
    assert not (tmp_path / "store").exists()  # refused before any work


def test_a_cluster_run_waits_for_placement_then_fails_naming_it(tiny_spec: dict) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    with pytest.raises(PlacementTimeout, match=r"finetune\.resources \(\{CPU: 4\}\)"):
        _run(
            tiny_spec,
            f"compute.ray_address={address}",
            "compute.placement_timeout_s=1",
            "finetune.resources.num_cpus=4",
        )

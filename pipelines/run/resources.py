"""What a plan asks Ray for, checked before any work so that no request waits forever.

A local Ray has what it has: a request it can never grant (4 CPUs on a 2-CPU Ray, a GPU
where there is none) is refused at once with one line naming the spec field (exit 2).
On a cluster an autoscaler may add nodes, so waiting is legitimate, but bounded: each
request must be placeable within ``compute.placement_timeout_s``, else the run fails
(exit 1) naming the request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines.spec.plan import Plan
from storage.errors import MergelineError, SystemFailure

_FIELDS = {"CPU": "num_cpus", "GPU": "num_gpus"}


@dataclass(frozen=True)
class Request:
    """``count`` bundles of ``bundle`` that Ray must hold at once for ``field``."""

    field: str
    bundle: dict[str, float]
    count: int = 1

    def describe(self) -> str:
        shown = ", ".join(f"{k}: {v:g}" for k, v in self.bundle.items())
        times = f"{self.count} × " if self.count > 1 else ""
        return f"{self.field} ({times}{{{shown}}})"


class ResourceRequestError(MergelineError):
    """The spec asks for more than the local Ray has."""


class PlacementTimeout(SystemFailure):
    """A cluster did not grant a request within ``compute.placement_timeout_s``."""

    def __init__(self, request: str, timeout_s: float) -> None:
        super().__init__(
            "placement",
            f"the cluster did not grant {request} within compute.placement_timeout_s "
            f"({timeout_s:g} s): add nodes that large, lower the request or raise the timeout",
        )
        self.request, self.timeout_s = request, timeout_s


def plan_requests(plan: Plan) -> list[Request]:
    """Every placement the run asks Ray for: each fine-tune (its Ray Train workers, all at
    once), the base model's pretraining, and each search actor."""
    resources = plan.spec.finetune.resources
    bundle = {"CPU": float(resources.num_cpus)}
    if resources.num_gpus > 0:
        bundle["GPU"] = float(resources.num_gpus)
    scorer = plan.spec.merge.resources
    search = {"CPU": float(scorer.num_cpus)}
    if scorer.num_gpus > 0:
        search["GPU"] = float(scorer.num_gpus)
    return [
        Request("finetune.resources", bundle, resources.num_workers),
        Request("base model pretraining", {"CPU": 1.0}),
        Request("merge.resources", search),
    ]


def check_requests(requests: list[Request], available: dict[str, float]) -> None:
    """Refuse the first request that ``available`` (a local Ray's resources) cannot hold."""
    for request in requests:
        for resource, amount in request.bundle.items():
            needed = amount * request.count
            have = float(available.get(resource, 0.0))
            if needed <= have + 1e-9:
                continue
            raise ResourceRequestError(_refusal(request, resource, amount, needed, have))


def _refusal(request: Request, resource: str, amount: float, needed: float, have: float) -> str:
    has = f"the local Ray has {have:g} {resource}s"
    if request.field == "merge.resources":
        return (
            f"merge.resources.{_FIELDS.get(resource, resource)} {amount:g} is more than the "
            f"local Ray's {have:g} {resource}s, so no scorer would start: lower it, "
            + ("raise compute.num_cpus" if resource == "CPU" else "use a machine that has them")
            + ", or join a cluster (compute.ray_address)"
        )
    if not request.field.startswith("finetune."):
        return (
            f"{request.describe()} needs {needed:g} {resource}s but {has}: raise compute.num_cpus"
        )
    field = f"{request.field}.{_FIELDS.get(resource, resource)}"
    if request.count > 1:
        return (
            f"{request.field}.num_workers {request.count} × {_FIELDS.get(resource, resource)} "
            f"{amount:g} needs {needed:g} {resource}s but {has}: use fewer workers, a smaller "
            "request, or a cluster (compute.ray_address)"
        )
    advice = "raise compute.num_cpus" if resource == "CPU" else "use a machine that has them"
    return (
        f"{field} {amount:g} is more than the local Ray's {have:g} {resource}s, so the "
        f"fine-tune would wait forever: lower it, {advice}, or join a cluster "
        "(compute.ray_address)"
    )


def refuse_impossible(plan: Plan, ray_address: str | None, num_cpus: int | None) -> list[Request]:
    """The plan's requests; on a local Ray (no ``ray_address``), refuse at once, before any
    work, what it can never hold."""
    requests = plan_requests(plan)
    if not ray_address:  # a local Ray can never grow
        check_requests(requests, local_resources(num_cpus))
    return requests


def await_placement(requests: list[Request], ray_address: str | None, timeout_s: float) -> None:
    """On a cluster, wait (bounded) until each request can be placed; a local Ray was checked
    by :func:`refuse_impossible` already."""
    if ray_address:  # an autoscaler may add nodes: wait, but not forever
        wait_for_placement(requests, timeout_s)


def local_resources(num_cpus: int | None) -> dict[str, float]:
    """What the Ray this run uses has: the running one, or the local one it will start
    (``compute.num_cpus`` or every core, and the GPUs CUDA shows)."""
    import ray

    if ray.is_initialized():
        return {k: float(v) for k, v in ray.cluster_resources().items()}
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def wait_for_placement(requests: list[Request], timeout_s: float) -> None:
    """Wait (at most ``timeout_s`` per request) until the cluster can place each request
    whole, as Ray Train places its workers; an autoscaler adds nodes meanwhile."""
    from ray.util.placement_group import placement_group, remove_placement_group

    for request in requests:
        group = placement_group([dict(request.bundle)] * request.count, strategy="PACK")
        try:
            ready = group.wait(timeout_seconds=timeout_s)
        finally:
            remove_placement_group(group)
        if not ready:
            raise PlacementTimeout(request.describe(), timeout_s)

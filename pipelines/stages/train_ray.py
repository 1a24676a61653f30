"""Data-parallel training of one task over ``resources.num_workers`` Ray Train workers.

The fine-tune task coordinates: it starts a ``TorchTrainer`` whose workers each run
:func:`~pipelines.stages.training.train_task` (DeepSpeed over a gloo or NCCL group that Ray Train
sets up), and reads the final state that rank 0 stores as the last checkpoint. A worker group
that dies (a preempted node, a killed process) is started again and resumes from the newest
checkpoint; a task's own error (it diverged, bad data) ends the task at once.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

from pipelines.stages.training import TrainOutcome, TrainRequest, read_final, train_task
from storage.errors import MergelineError, SystemFailure

#: Worker-group restarts after a system failure, as Ray's retries for a one-worker task.
GROUP_RESTARTS = 2


def _train_worker(config: dict[str, Any]) -> None:
    train_task(config["request"], keep_final=True)


def train_with_ray_train(request: TrainRequest) -> TrainOutcome:
    """Train ``request`` on a worker group; raises the task's own error as itself."""
    for restart in range(GROUP_RESTARTS + 1):
        try:
            _trainer(request).fit()
            return read_final(request)
        except Exception as error:  # noqa: BLE001 - sorted into the task's own errors and the rest
            own = _task_error(error)
            if own is not None:
                raise own from None
            if restart == GROUP_RESTARTS:
                raise SystemFailure(
                    f"fine-tune '{request.task}'", f"{type(error).__name__}: {error}"
                ) from None
    raise AssertionError("unreachable")


def _trainer(request: TrainRequest):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = request.finetune["resources"]
    use_gpu = resources["num_gpus"] > 0
    per_worker = {"CPU": resources["num_cpus"]}
    if use_gpu:
        per_worker["GPU"] = resources["num_gpus"]
    return TorchTrainer(
        _train_worker,
        train_loop_config={"request": request},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=resources["num_workers"],
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
        ),
        run_config=RunConfig(
            name=f"mergeline-finetune-{request.task}-{uuid.uuid4().hex[:8]}",
            storage_path=os.path.join(tempfile.gettempdir(), "mergeline-ray-train"),
            failure_config=FailureConfig(max_failures=0),  # restarts are ours: a task's own
        ),  # error must not be retried
    )


def _task_error(error: BaseException) -> MergelineError | None:
    """The task's own error (a MergelineError raised on some worker), if that is what failed."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        seen: set[int] = set()
        while failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            if isinstance(failure, MergelineError):
                return failure
            failure = getattr(failure, "cause", None) or failure.__cause__
    return None

"""The DeepSpeed engine: the same step as :class:`~workers.finetune.engine.TorchEngine`, through a
DeepSpeed engine with ZeRO stage 0, 1 or 2, on one process or data-parallel over several.

The DeepSpeed config is *generated* from the typed spec (:func:`deepspeed_config`): batch size,
optimizer and precision have one source of truth. On CPU it trains in fp32 with the gloo backend
and torch's own Adam, so nothing but DeepSpeed's small communication op is ever compiled. On GPUs
ZeRO 1-2 train in bf16 (DeepSpeed keeps fp32 master weights there); ZeRO 0 stays fp32, since
DeepSpeed's stage-0 bf16 path keeps its masters where no public API reaches them.

State leaves the engine consolidated: fp32 master weights and per-parameter Adam moments gathered
over the ZeRO partitions (``deepspeed.utils.safe_get_full_*``), so checkpoints and task vectors do
not depend on the number of workers or the stage.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
from torch import Tensor, nn

from storage.errors import MergelineError
from workers.finetune.engine import (
    LossFn,
    StateDict,
    cross_entropy,
    flatten_optimizer,
    load_trained,
    trainable_parameters,
    unflatten_optimizer,
)
from workers.finetune.loop import TrainConfig


class DeepSpeedUnavailable(MergelineError):
    """finetune.deepspeed is set but DeepSpeed cannot be imported or started here."""


def deepspeed_config(
    config: TrainConfig, zero_stage: int, world_size: int, bf16: bool
) -> dict[str, Any]:
    """The DeepSpeed config for one fine-tune: ``batch_size`` is the global batch."""
    return {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": config.lr,
                "weight_decay": config.weight_decay,
                "torch_adam": True,  # no compiled optimizer kernel
                "adam_w_mode": False,  # L2 weight decay, as torch.optim.Adam in the plain loop
            },
        },
        # No clipping here, so the gradient norm is never needed (and costs a pass per step).
        "zero_optimization": {"stage": zero_stage}
        | ({"compute_grad_norm": False} if zero_stage in (1, 2) and not bf16 else {}),
        "gradient_clipping": 0.0,  # the plain loop does not clip either
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def ensure_process_group() -> None:
    """A one-process group on 127.0.0.1 unless a launcher (Ray Train) already made one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:  # ours, from an earlier engine in this process
            os.environ.setdefault("LOCAL_RANK", "0")
        return
    for attempt in range(5):  # a free port can be taken by another process before we bind it
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        try:
            _deepspeed().init_distributed(dist_backend=_backend(), verbose=False)
            return
        except dist.DistNetworkError as error:
            if "EADDRINUSE" not in str(error) or attempt == 4:
                raise


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _deepspeed():
    if not torch.cuda.is_available():  # DeepSpeed's own detection logs a warning first
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as error:
        raise DeepSpeedUnavailable(
            f"finetune.deepspeed needs the deepspeed package ({error}): install it, or set "
            "finetune.deepspeed to null for the plain PyTorch loop"
        ) from None
    return deepspeed


def inputs_for(inputs: Tensor, device: torch.device, bf16: bool) -> Tensor:
    """``inputs`` on ``device``; floating-point features in bf16 when the engine trains in bf16.

    Integer inputs (token ids, packed text batches) keep their dtype: an embedding lookup needs
    integers, and bf16 could not even represent ids above 256 exactly.
    """
    dtype = torch.bfloat16 if bf16 and inputs.is_floating_point() else inputs.dtype
    return inputs.to(device, dtype)


class DeepSpeedEngine:
    """Adam through ``deepspeed.initialize``; one instance per worker process."""

    name = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        zero_stage: int,
        loss_fn: LossFn = cross_entropy,
    ) -> None:
        import torch.distributed as dist

        deepspeed = _deepspeed()
        if zero_stage not in (0, 1, 2):
            raise MergelineError(
                f"finetune.deepspeed.zero_stage {zero_stage} is not supported: use 0, 1 or 2"
            )
        ensure_process_group()
        self.loss_fn = loss_fn
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        from deepspeed.accelerator import get_accelerator

        # bf16 where DeepSpeed keeps fp32 masters we can consolidate (ZeRO 1-2); else fp32.
        self.bf16 = get_accelerator().device_name() != "cpu" and zero_stage > 0
        self.config = deepspeed_config(config, zero_stage, self.world_size, self.bf16)
        parameters = trainable_parameters(model)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=list(parameters.values()), config=self.config
        )
        self.device = torch.device(self.engine.device)
        if self.world_size == 1 and zero_stage == 0:  # averaging over one worker: skip it
            self.engine.enable_backward_allreduce = False
        self.parameters = trainable_parameters(self.engine.module)
        # ZeRO 1-2 and bf16 keep fp32 masters and optimizer state in partitions ("hp" tensors).
        self.partitioned = any(hasattr(p, "_hp_mapping") for p in self.parameters.values())

    def loss(self, inputs: Tensor, labels: Tensor) -> Tensor:
        inputs = inputs_for(inputs, self.device, self.bf16)
        return self.loss_fn(self.engine(inputs), inputs, labels)

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item()) / self.world_size

    def update(self, loss: Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    # ------------------------------------------------------------------ consolidated state
    def model_state(self) -> StateDict:
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, parameter in self.parameters.items():
            full = safe_get_full_fp32_param(parameter) if self.partitioned else None
            state[name] = (parameter.detach() if full is None else full).float().cpu().clone()
        return state

    def optimizer_state(self) -> tuple[StateDict, dict[str, Any]]:
        if not self.partitioned:  # ZeRO 0 in fp32: DeepSpeed steps a plain torch optimizer
            return flatten_optimizer(self.engine.optimizer, self._optimizer_names())
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self.engine.optimizer.optimizer
        states = [base.state[p] for group in base.param_groups for p in group["params"]]
        if not any(states):  # before the first step
            return {}, {"param_groups": []}
        step = states[0]["step"]
        keys = [k for k, v in states[0].items() if k != "step" and isinstance(v, Tensor)]
        tensors: StateDict = {}
        for name, parameter in self.parameters.items():
            tensors[f"{name}/step"] = torch.as_tensor(step, dtype=torch.float32).cpu().clone()
            for key in keys:
                full = safe_get_full_optimizer_state(parameter, key)
                tensors[f"{name}/{key}"] = full.float().cpu().clone()
        hyper = {k: v for k, v in base.param_groups[0].items() if k != "params"}
        hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()}
        return tensors, {"param_groups": [hyper | {"params": list(self.parameters)}]}

    def load_state(self, model: StateDict, optimizer: StateDict, info: dict[str, Any]) -> None:
        load_trained(self.engine.module, model)
        if not self.partitioned:
            unflatten_optimizer(self.engine.optimizer, self._optimizer_names(), optimizer, info)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for name, parameter in self.parameters.items():
            safe_set_full_fp32_param(parameter, model[name].to(self.device, torch.float32))
        if not optimizer:
            return
        zero = self.engine.optimizer
        base = zero.optimizer
        keys = sorted({key.rpartition("/")[2] for key in optimizer} - {"step"})
        step = next(v for k, v in optimizer.items() if k.endswith("/step"))
        # Adam creates its state on the first step: create it (zeros), link DeepSpeed's views of
        # it to the parameters, then fill in each parameter's fragment of the full state.
        partitions = [p for group in base.param_groups for p in group["params"]]
        base.load_state_dict(
            {
                "state": {
                    i: {"step": step.clone()} | {k: torch.zeros_like(p) for k in keys}
                    for i, p in enumerate(partitions)
                },
                "param_groups": base.state_dict()["param_groups"],
            }
        )
        zero._lazy_init_hp_params_optimizer_state()
        for name, parameter in self.parameters.items():
            for key in keys:
                value = optimizer[f"{name}/{key}"].to(self.device, torch.float32)
                safe_set_full_optimizer_state(parameter, value, key)

    def _optimizer_names(self) -> list[str]:
        by_id = {id(p): name for name, p in self.parameters.items()}
        groups = self.engine.optimizer.param_groups
        return [by_id[id(p)] for group in groups for p in group["params"]]

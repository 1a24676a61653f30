"""The DeepSpeed engine: the same step as :class:`~workers.finetune.engine.TorchEngine`, through a
DeepSpeed engine with ZeRO stage 0, 1 or 2, on one process or data-parallel over several.

The DeepSpeed config is *generated* from the typed spec (:func:`deepspeed_config`): batch size,
accumulation, optimizer, clipping and precision have one source of truth; the LR schedule is the
torch engine's scheduler, which DeepSpeed steps. On CPU it uses the gloo backend and torch's own
Adam, so nothing but DeepSpeed's small communication op is ever compiled. ``finetune.precision``
bf16 or fp16 uses DeepSpeed's own mixed precision, with ZeRO 1-2 only: there DeepSpeed keeps
fp32 master weights we can consolidate; its stage-0 paths keep them where no public API reaches.

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
from workers.finetune.settings import (
    AUTOCAST_DTYPES,
    TrainConfig,
    enable_gradient_checkpointing,
    load_scheduler_state,
    make_scheduler,
    scheduler_state,
)

#: What DeepSpeed's dynamic loss scaler (fp16) carries from one step to the next.
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class DeepSpeedUnavailable(MergelineError):
    """finetune.deepspeed is set but DeepSpeed cannot be imported or started here."""


def deepspeed_config(config: TrainConfig, zero_stage: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one fine-tune: ``batch_size`` is the global batch of one
    optimizer step, over ``world_size`` workers x ``grad_accumulation`` micro-batches."""
    clipping = config.max_grad_norm or 0.0
    # Without clipping or a loss scale to check, the gradient norm is never needed.
    skip_norm = zero_stage in (1, 2) and config.precision == "fp32" and not clipping
    return {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": config.batch_size
        // (world_size * config.grad_accumulation),
        "gradient_accumulation_steps": config.grad_accumulation,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": config.lr,
                "weight_decay": config.weight_decay,
                "torch_adam": True,  # no compiled optimizer kernel
                "adam_w_mode": False,  # L2 weight decay, as torch.optim.Adam in the plain loop
            },
        },
        "zero_optimization": {"stage": zero_stage}
        | ({"compute_grad_norm": False} if skip_norm else {}),
        "gradient_clipping": clipping,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
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


def inputs_for(inputs: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``inputs`` on ``device``; floating-point features in ``dtype``, the engine's (a DeepSpeed
    engine in bf16 or fp16 holds its module in that dtype).

    Integer inputs (token ids, packed text batches) keep their dtype: an embedding lookup needs
    integers, and bf16 could not even represent ids above 256 exactly.
    """
    return inputs.to(device, dtype if inputs.is_floating_point() else inputs.dtype)


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
        if config.precision != "fp32" and zero_stage == 0:
            raise MergelineError(
                f"finetune.precision {config.precision} with DeepSpeed needs ZeRO stage 1 or 2 "
                "(stage 0 keeps no reachable fp32 master weights): set deepspeed.zero_stage"
            )
        from deepspeed.accelerator import get_accelerator

        if config.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise MergelineError(
                "finetune.precision fp16: DeepSpeed has no fp16 on this "
                f"{get_accelerator().device_name()} (use bf16 on CPU, or the plain PyTorch loop)"
            )
        ensure_process_group()
        self.loss_fn = loss_fn
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dtype = {"fp32": torch.float32, **AUTOCAST_DTYPES}[config.precision]
        self.config = deepspeed_config(config, zero_stage, self.world_size)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        parameters = trainable_parameters(model)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=list(parameters.values()),
            config=self.config,
            lr_scheduler=lambda optimizer: make_scheduler(optimizer, config),  # DeepSpeed steps it
        )
        self.device = torch.device(self.engine.device)
        if self.world_size == 1 and zero_stage == 0:  # averaging over one worker: skip it
            self.engine.enable_backward_allreduce = False
        self.parameters = trainable_parameters(self.engine.module)
        # ZeRO 1-2 and bf16 keep fp32 masters and optimizer state in partitions ("hp" tensors).
        self.partitioned = any(hasattr(p, "_hp_mapping") for p in self.parameters.values())

    def loss(self, inputs: Tensor, labels: Tensor) -> Tensor:
        inputs = inputs_for(inputs, self.device, self.dtype)
        return self.loss_fn(self.engine(inputs), inputs, labels)

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item()) / self.world_size

    def update(self, loss: Tensor) -> None:
        self.engine.backward(loss)  # scaled by 1 / gradient_accumulation_steps
        self.engine.step()  # an optimizer step at the accumulation boundary only

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

    def step_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scheduler": scheduler_state(self.engine.lr_scheduler)}
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        if self.dtype == torch.float16 and scaler is not None:
            values = {key: getattr(scaler, key) for key in LOSS_SCALER_FIELDS}
            state["scaler"] = {
                k: v.item() if isinstance(v, Tensor) else v for k, v in values.items()
            }
        return state

    def load_state(
        self,
        model: StateDict,
        optimizer: StateDict,
        info: dict[str, Any],
        step_state: dict[str, Any] | None = None,
    ) -> None:
        self._load_weights_and_optimizer(model, optimizer, info)
        step_state = step_state or {}
        if "scheduler" in step_state:  # else: from before LR schedules, i.e. a constant LR
            load_scheduler_state(self.engine.lr_scheduler, step_state["scheduler"])
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        for key, value in step_state.get("scaler", {}).items():
            setattr(scaler, key, value)

    def _load_weights_and_optimizer(
        self, model: StateDict, optimizer: StateDict, info: dict[str, Any]
    ) -> None:
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

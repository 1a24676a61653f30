"""The DeepSpeed engine: the same step as :class:`~workers.finetune.engine.TorchEngine`, through a
DeepSpeed engine with ZeRO stage 0 to 3, on one process or data-parallel over several.

The DeepSpeed config is *generated* from the typed spec (:func:`deepspeed_config`): batch size,
accumulation, optimizer, clipping and precision have one source of truth; the LR schedule is the
torch engine's scheduler, which DeepSpeed steps. On CPU it uses the gloo backend and torch's own
Adam, and DeepSpeed compiles nothing (:func:`_without_cpu_inference_kernel`). ``finetune.precision``
bf16 or fp16 uses DeepSpeed's own mixed precision, with ZeRO 1-2 only: there DeepSpeed keeps
fp32 master weights we can consolidate; its stage-0 paths keep them where no public API reaches.

State leaves the engine per rank (:mod:`workers.finetune.shards`): each rank its own ZeRO
partition of the fp32 master weights and Adam moments, as flat ranges of each parameter, so a
checkpoint is written by every rank at once and no rank gathers the optimizer state. Only the
trained weights are consolidated, at the end, one parameter at a time (under ZeRO-3 each is
gathered with ``deepspeed.zero.GatheredParameters`` and released before the next). ZeRO-3 (fp32
only) partitions the weights themselves: for models too large for one device.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from storage.errors import MergelineError
from workers.finetune.engine import (
    LossFn,
    StateDict,
    cross_entropy,
    load_replicated,
    optimizer_info,
    replicated_shard,
    trainable_parameters,
)
from workers.finetune.settings import (
    AUTOCAST_DTYPES,
    TrainConfig,
    enable_gradient_checkpointing,
    load_scheduler_state,
    make_scheduler,
    scheduler_state,
)
from workers.finetune.shards import RankShard, ShardedState

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
        | ({"compute_grad_norm": False} if skip_norm else {})
        # ZeRO-3's own linear would replace torch.nn.functional.linear for the whole process,
        # and a later fine-tune there (linear mode's forward-mode AD) would break on it.
        | ({"memory_efficient_linear": False} if zero_stage == 3 else {}),
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
            import_deepspeed().init_distributed(dist_backend=_backend(), verbose=False)
            return
        except dist.DistNetworkError as error:
            if "EADDRINUSE" not in str(error) or attempt == 4:
                raise


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def import_deepspeed():
    if not torch.cuda.is_available():  # DeepSpeed's own detection logs a warning first
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as error:
        raise DeepSpeedUnavailable(
            f"finetune.deepspeed needs the deepspeed package ({error}): install it, or set "
            "finetune.deepspeed to null for the plain PyTorch loop"
        ) from None
    _without_cpu_inference_kernel(deepspeed)
    return deepspeed


#: DeepSpeed's CPU shared-memory all-reduce kernel (its op builder's NAME)
SHM_COMM_OP = "deepspeed_shm_comm"


def _without_cpu_inference_kernel(deepspeed: Any) -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce kernel.

    DeepSpeed builds it (ninja and a C++ compiler: about 90 s on a fresh machine, 66 CPU-s)
    when its torch backend starts on the CPU accelerator, but only tensor-parallel inference
    calls it (``inference_all_reduce``, which falls back to torch.distributed without it).
    Training's collectives are torch.distributed's (gloo) either way. DeepSpeed asks
    ``deepspeed.ops.__compatible_ops__`` whether the op can be built; marking it unbuildable
    there, before the backend starts, skips the build. Nothing changes on a GPU (the CUDA
    accelerator has no such op) or if a DeepSpeed release renames the op.
    """
    if deepspeed.get_accelerator().device_name() != "cpu":
        return
    compatible = deepspeed.ops.__compatible_ops__
    if SHM_COMM_OP in compatible:
        compatible[SHM_COMM_OP] = False


def gather_json(value: Any, rank: int, world_size: int, device: torch.device) -> list[Any]:
    """Every rank's ``value`` (JSON-able) on rank 0, by rank; ``[]`` on the others. Sent as
    JSON bytes in tensors, so that nothing is pickled."""
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    data = torch.tensor(bytearray(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    padded = torch.zeros(int(max(size.item() for size in sizes)), dtype=torch.uint8, device=device)
    padded[: len(data)] = data
    received = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(received, padded)
    if rank != 0:
        return []
    return [
        json.loads(bytes(part[: int(size.item())].cpu().tolist()))
        for part, size in zip(received, sizes, strict=True)
    ]


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

        deepspeed = import_deepspeed()
        if zero_stage not in (0, 1, 2, 3):
            raise MergelineError(
                f"finetune.deepspeed.zero_stage {zero_stage} is not supported: use 0, 1, 2 or 3"
            )
        if config.precision != "fp32" and zero_stage == 3:
            raise MergelineError(
                f"finetune.precision {config.precision} with DeepSpeed ZeRO stage 3 is not "
                "supported yet: use fp32, or deepspeed.zero_stage 1 or 2"
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
        self.stage = zero_stage
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
        # ZeRO 1-2 and bf16 keep fp32 masters and optimizer state in partitions ("hp" tensors);
        # ZeRO-3 the weights too.
        self.partitioned = zero_stage == 3 or any(
            hasattr(p, "_hp_mapping") for p in self.parameters.values()
        )

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

    # ------------------------------------------------------------------ state
    def model_state(self) -> StateDict:
        """The fp32 weights, consolidated one parameter at a time (under ZeRO-3 each is
        gathered over the ranks, copied to the CPU and released before the next)."""
        return dict(self.gathered_parameters())

    def gathered_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """Each trained parameter's whole fp32 value in turn, on the CPU (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        gathered = import_deepspeed().zero.GatheredParameters

        for name, parameter in self.parameters.items():
            if self.stage == 3:
                with gathered([parameter]):
                    value = parameter.detach().float().cpu().clone()
            else:
                full = safe_get_full_fp32_param(parameter) if self.partitioned else None
                value = (parameter.detach() if full is None else full).float().cpu().clone()
            yield name, value

    def shard_state(self) -> tuple[RankShard, dict[str, Any]]:
        if not self.partitioned:  # ZeRO 0 in fp32: every rank holds all of a torch optimizer
            return replicated_shard(
                self.parameters, self.engine.optimizer, self.rank, self.world_size
            )
        base = self.engine.optimizer.optimizer
        states = [base.state.get(p, {}) for p in self._flat_partitions()]
        started = any(states)  # Adam creates its state on the first step
        keys = [k for k, v in states[0].items() if k != "step" and isinstance(v, Tensor)]
        shapes, ranges, tensors = {}, {}, {}
        for name, parameter in self.parameters.items():
            shapes[name] = tuple(self._shape(parameter))
            ranges[name] = start, stop = self._range(parameter)
            if stop == start:
                continue
            tensors[name] = self._local(parameter, stop - start).float().cpu().clone()
            for key in keys if started else ():
                local = self._local(parameter, stop - start, key)
                tensors[f"{name}/{key}"] = local.float().cpu().clone()
        step = float(states[0]["step"]) if started else None
        info = optimizer_info(base, list(self.parameters), step)
        for group in info["param_groups"]:  # DeepSpeed's flat partitions: every parameter
            group["params"] = list(self.parameters)
        return RankShard(self.rank, self.world_size, shapes, ranges, tensors), info

    def gather_json(self, value: Any) -> list[Any]:
        return gather_json(value, self.rank, self.world_size, self.device)

    def _flat_partitions(self) -> list[Tensor]:
        """This rank's flat fp32 partitions, the tensors DeepSpeed's inner Adam steps."""
        zero = self.engine.optimizer
        if self.stage == 3:  # its param groups hold them only during a step
            return list(zero.fp32_partitioned_groups_flat)
        return [p for group in zero.optimizer.param_groups for p in group["params"]]

    def _shape(self, parameter: nn.Parameter) -> torch.Size:
        return parameter.ds_shape if self.stage == 3 else parameter.shape

    def _range(self, parameter: nn.Parameter) -> tuple[int, int]:
        """The elements of ``parameter`` (flattened) whose fp32 master this rank holds."""
        if self.stage == 3:  # ds_tensor: this rank's partition, padded on the last ranks
            size = parameter.ds_tensor.ds_numel
            start = min(self.rank * size, parameter.ds_numel)
            return start, min(start + size, parameter.ds_numel)
        mapping = parameter._hp_mapping
        if mapping is None:  # ZeRO 1-2: nothing of it in this rank's partition
            return 0, 0
        address = mapping.lp_fragment_address
        return address.start, address.start + address.numel

    def _local(self, parameter: nn.Parameter, numel: int, key: str | None = None) -> Tensor:
        """This rank's fp32 master (or optimizer tensor ``key``) of ``parameter``, flat."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            local = (
                safe_get_local_fp32_param(parameter)
                if key is None
                else safe_get_local_optimizer_state(parameter, key)
            )
            return local.reshape(-1)[:numel]
        return parameter._hp_mapping.get_hp_fragment(key).reshape(-1)

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
        shards: ShardedState,
        info: dict[str, Any],
        step_state: dict[str, Any] | None = None,
    ) -> None:
        if not self.partitioned:
            load_replicated(self.parameters, self.engine.optimizer, shards, info)
        else:
            self._load_partitions(shards, info)
        step_state = step_state or {}
        if "scheduler" in step_state:  # else: from before LR schedules, i.e. a constant LR
            load_scheduler_state(self.engine.lr_scheduler, step_state["scheduler"])
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        for key, value in step_state.get("scaler", {}).items():
            setattr(scaler, key, value)

    def _load_partitions(self, shards: ShardedState, info: dict[str, Any]) -> None:
        """ZeRO 1-3: each rank reads its own range of the fp32 masters and optimizer state;
        under ZeRO 1-2 also the whole weights, which every rank holds in its module."""
        if set(self.parameters) != set(shards.shapes):
            raise ValueError(
                f"trained state does not fit the model: {sorted(self.parameters)} against "
                f"{sorted(shards.shapes)}"
            )
        zero = self.engine.optimizer
        base = zero.optimizer
        step = info.get("step")
        keys = shards.optimizer_keys if step is not None else []
        if keys:
            # Adam creates its state on the first step: create it (zeros), link DeepSpeed's
            # views of it to the parameters (ZeRO 1-2), then fill in each parameter's part.
            for partition in self._flat_partitions():
                base.state[partition] = {"step": torch.tensor(float(step))} | {
                    key: torch.zeros_like(partition) for key in keys
                }
            if self.stage != 3:
                zero._lazy_init_hp_params_optimizer_state()
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                start, stop = self._range(parameter)
                if self.stage != 3:  # the module's whole weights, and this rank's masters
                    full = shards.full(name).to(self.device)
                    parameter.copy_(full.to(parameter.dtype))
                    if stop > start:
                        self._local(parameter, stop - start).copy_(full.reshape(-1)[start:stop])
                    for key in keys if stop > start else ():
                        value = shards.read(name, start, stop, key).to(self.device)
                        self._local(parameter, stop - start, key).copy_(value)
                    continue
                self._load_stage3(parameter, shards.read(name, start, stop), None)
                for key in keys:
                    self._load_stage3(parameter, shards.read(name, start, stop, key), key)

    def _load_stage3(self, parameter: nn.Parameter, value: Tensor, key: str | None) -> None:
        """This rank's partition of ``parameter`` (padded as ZeRO-3 pads it) from ``value``."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        padded = torch.zeros(parameter.ds_tensor.ds_numel, dtype=torch.float32, device=self.device)
        padded[: len(value)] = value.to(self.device)
        if key is None:
            safe_set_local_fp32_param(parameter, padded)
            parameter.ds_tensor.data.copy_(padded.to(parameter.ds_tensor.dtype))
        else:
            safe_set_local_optimizer_state(parameter, padded, key)

"""The fine-tune section of a spec: mode, optimizer, precision and memory, DeepSpeed, LoRA
adapter, resources."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.spec.base import SpecModel


class DeepSpeedSpec(SpecModel):
    zero_stage: Literal[0, 1, 2, 3] = 0


class ResourcesSpec(SpecModel):
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, gt=0)
    num_workers: int = Field(default=1, ge=1)


class AdapterSpec(SpecModel):
    """A LoRA adapter (PEFT): the task vector is its factors, ΔW = (alpha / r)·B·A per module."""

    kind: Literal["lora"] = "lora"
    r: int = Field(default=16, gt=0, description="LoRA rank of every adapted module.")
    alpha: float = Field(default=32.0, gt=0.0, description="LoRA alpha: the scale is alpha / r.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout in training.")
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Module names (or name suffixes) to adapt. Default: PEFT's default for the "
        "architecture (q_proj and v_proj for Llama, query and value for BERT); every linear "
        "layer of a builtin MLP.",
    )


class FinetuneSpec(SpecModel):
    mode: Literal["standard", "linear"] = "standard"
    steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=1.0e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    head: Literal["frozen"] = "frozen"
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="Mixed precision of the forward and backward passes; the trained weights "
        "and the task vector stay fp32. Plain PyTorch: autocast (with a gradient scaler for "
        "fp16); DeepSpeed: its bf16 / fp16 modes (ZeRO stage 1 or 2).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass instead of keeping them "
        "(less memory, about one more forward pass per step). Hugging Face models only; not in "
        "linear mode.",
    )
    grad_accumulation: int = Field(
        default=1,
        ge=1,
        description="Micro-batches per optimizer step: each worker's share of batch_size is "
        "split into this many, whose gradients add up before the step (same step, less "
        "memory). batch_size must be a multiple of num_workers x grad_accumulation.",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant",
        description="Learning rate over the steps after warmup: constant, linear decay to 0, "
        "or cosine decay to 0 (transformers' schedules).",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="Optimizer steps of linear warmup from 0 to lr before lr_schedule applies.",
    )
    max_grad_norm: float | None = Field(
        default=None,
        gt=0.0,
        description="Clip the global gradient norm to this value before each optimizer step; "
        "null: no clipping.",
    )
    deepspeed: DeepSpeedSpec | None = None
    adapter: AdapterSpec | None = Field(
        default=None,
        description="Fine-tune a LoRA adapter instead of every weight (PEFT). In linear mode "
        "the model is linearized in the adapter's parameters only.",
    )
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint_every: int | None = Field(
        default=None,
        gt=0,
        description="Save resumable state (model, optimizer, data position, RNG) to the store "
        "every this many steps; a retried or rerun fine-tune resumes from the newest one.",
    )
    on_task_failure: Literal["fail", "skip"] = Field(
        default="fail",
        description="A task whose fine-tune fails for good (its own error, e.g. divergence): "
        "fail the run, or skip the task and merge the others.",
    )

    @model_validator(mode="after")
    def _linear_needs_jvp(self) -> FinetuneSpec:
        if self.mode == "linear" and self.deepspeed and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "finetune.mode 'linear' needs forward-mode AD, which ZeRO stage 3 does not "
                "support: use deepspeed.zero_stage 0, 1 or 2"
            )
        return self

    @model_validator(mode="after")
    def _training_settings(self) -> FinetuneSpec:
        if self.gradient_checkpointing and self.mode == "linear":
            raise ValueError(
                "finetune.gradient_checkpointing does not apply in linear mode (the linearized "
                "network runs in eval mode, where checkpointing is off): set it to false"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"finetune.warmup_steps {self.warmup_steps} must be fewer than steps {self.steps}"
            )
        stage = self.deepspeed.zero_stage if self.deepspeed else None
        if self.precision != "fp32" and stage == 0:
            raise ValueError(
                f"finetune.precision {self.precision} with DeepSpeed needs deepspeed.zero_stage "
                "1 or 2 (stage 0 keeps no fp32 master weights we can read): set it, or use fp32"
            )
        if self.precision != "fp32" and stage == 3:
            raise ValueError(
                f"finetune.precision {self.precision} with DeepSpeed ZeRO stage 3 is not "
                "supported yet: use fp32, or deepspeed.zero_stage 1 or 2"
            )
        return self

    @model_validator(mode="after")
    def _adapter_stage(self) -> FinetuneSpec:
        if self.adapter and self.deepspeed and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "finetune.adapter trains with DeepSpeed ZeRO stage 0, 1 or 2 (stage 3 would "
                "partition the frozen base too): set deepspeed.zero_stage to 0, 1 or 2"
            )
        return self

    @model_validator(mode="after")
    def _data_parallel(self) -> FinetuneSpec:
        workers = self.resources.num_workers
        if workers > 1 and self.deepspeed is None:
            raise ValueError(
                "finetune.resources.num_workers > 1 trains data-parallel through DeepSpeed: "
                "set finetune.deepspeed (e.g. {zero_stage: 2}) or use one worker"
            )
        if self.batch_size % workers:
            raise ValueError(
                f"finetune.batch_size {self.batch_size} is the global batch and must split "
                f"evenly over resources.num_workers {workers}"
            )
        if self.batch_size % (workers * self.grad_accumulation):
            raise ValueError(
                f"finetune.batch_size {self.batch_size} must split evenly into "
                f"resources.num_workers {workers} x grad_accumulation {self.grad_accumulation} "
                "micro-batches"
            )
        return self


#: Settings added after task vectors were first stored, with the value that reproduces what
#: was trained before them: at that value they stay out of the task-vector key.
KEY_NEUTRAL_DEFAULTS = {
    "adapter": None,
    "precision": "fp32",
    "gradient_checkpointing": False,
    "grad_accumulation": 1,
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "max_grad_norm": None,
}

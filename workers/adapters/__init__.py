"""Parameter-efficient task vectors: LoRA adapters (PEFT) and the factors they store."""

from workers.adapters.factors import (
    Factor,
    LoraDelta,
    concat_factors,
    factors_from_tensors,
    factors_to_tensors,
)
from workers.adapters.lora import (
    adapter_names,
    frozen_outside_adapter,
    lora_config,
    lora_trainable,
    trained_factors,
    with_lora,
    without_lora,
)

__all__ = [
    "Factor",
    "LoraDelta",
    "adapter_names",
    "concat_factors",
    "factors_from_tensors",
    "factors_to_tensors",
    "frozen_outside_adapter",
    "lora_config",
    "lora_trainable",
    "trained_factors",
    "with_lora",
    "without_lora",
]

"""Fine-tuning: the training loop and the linearized (tangent-space) model."""

from workers.finetune.linearized import (
    LinearizedModel,
    delta_between,
    jvp_many,
    jvp_outputs,
    linearized_forward,
    pack_linearized,
    tangent_names,
    unpack_linearized,
)
from workers.finetune.loop import DivergenceError, TrainConfig, train

__all__ = [
    "DivergenceError",
    "LinearizedModel",
    "TrainConfig",
    "delta_between",
    "jvp_many",
    "jvp_outputs",
    "linearized_forward",
    "pack_linearized",
    "tangent_names",
    "train",
    "unpack_linearized",
]

"""A multi-worker DeepSpeed fine-tune without Ray, for the tests: ``world_size`` processes on
CPU over gloo, each a rank, checkpointing through the same functions as the fine-tune stage.

:func:`run_ranks` starts the processes and waits; rank 0 saves the trained weights
(``model_state``, consolidated as the stage does it) to ``out``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch

from workers.finetune import TrainConfig
from workers.finetune.engine import Classifier
from workers.models import build_backbone

BACKBONE = {"source": "builtin", "name": "mlp", "hidden": [16], "features": 4, "seed": 0}
CONFIG = TrainConfig(steps=24, batch_size=32, lr=1e-2, weight_decay=1e-4)
KEY = "k"
#: The step after which a "checkpoint" run stores its state and stops.
STOP_AT = 12


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def model() -> Classifier:
    backbone = build_backbone(BACKBONE, 6)
    weight = 10 * torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    return Classifier(backbone, {"weight": weight, "bias": torch.zeros(2)})


class _Stop(Exception):
    pass


def run_ranks(world_size: int, stage: int, store_uri: str, action: str, out: Path) -> None:
    """``action``: "checkpoint" (train, store the state after :data:`STOP_AT` steps, stop),
    "resume" (from the store's newest checkpoint to the end) or "straight"."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(
        _rank,
        args=(world_size, port, stage, store_uri, action, str(out)),
        nprocs=world_size,
        start_method="spawn",
    )


def _rank(
    rank: int, world_size: int, port: int, stage: int, store_uri: str, action: str, out: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from pipelines.stages.training import load_checkpoint, save_checkpoint
    from storage.objectstore import open_store
    from workers.finetune.deepspeed_engine import DeepSpeedEngine, import_deepspeed
    from workers.finetune.loop import fit

    import_deepspeed().init_distributed(dist_backend="gloo", verbose=False)
    store = open_store(store_uri)
    engine = DeepSpeedEngine(model(), CONFIG, stage)
    start = load_checkpoint(store, KEY) if action == "resume" else None
    if action == "resume" and (start is None or start.step != STOP_AT):
        raise AssertionError(f"no checkpoint of step {STOP_AT} to resume from")

    def stop(state) -> None:
        save_checkpoint(store, KEY, engine, state, {"workers": world_size})
        raise _Stop

    try:
        every = STOP_AT if action == "checkpoint" else None
        fit(engine, *data(), CONFIG, "t", start, every, stop)
    except _Stop:
        pass
    else:
        weights = engine.model_state()  # collective: every rank takes part
        if rank == 0:
            save_file(weights, out)
    # Leave together, and end the group before the interpreter does: gloo's threads that
    # outlive the group at exit abort the process ("terminate called without an active
    # exception", pytorch/pytorch#190489) when the other rank is slower to finish.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

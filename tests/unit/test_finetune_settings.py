"""Fine-tune settings in the torch engine: precision, accumulation, LR schedule, clipping,
gradient checkpointing, and their state across a resume. The defaults train as before, bit for
bit."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from storage.errors import MergelineError
from tests.conftest import REPO
from tests.lm_fixtures import tiny_llama
from workers.finetune import TrainConfig
from workers.finetune.checkpoint import decode_state, encode_state
from workers.finetune.engine import Classifier, TorchEngine, TrainState
from workers.finetune.loop import fit
from workers.finetune.settings import enable_gradient_checkpointing
from workers.kinds import get_kind
from workers.models import build_backbone
from workers.models.causal_lm import CausalLM

BACKBONE = {"source": "builtin", "name": "mlp", "hidden": [16], "features": 4}
CONFIG = TrainConfig(steps=30, batch_size=16, lr=1e-2, weight_decay=1e-4, seed=3)


def _data(rows: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 6)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def _model() -> Classifier:
    torch.manual_seed(0)
    backbone = build_backbone(BACKBONE, 6)
    head = {
        "weight": torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),
        "bias": torch.zeros(2),
    }
    return Classifier(backbone, head)


def _train(config: TrainConfig, **fit_args) -> tuple[TorchEngine, list[dict[str, float]]]:
    engine = TorchEngine(_model(), config)
    history = fit(engine, *_data(), config, "t", **fit_args)
    return engine, history


def _record_steps(engine: TorchEngine) -> list[dict[str, float]]:
    """The LR and the global gradient norm the optimizer sees at each of its steps."""
    seen: list[dict[str, float]] = []

    def hook(optimizer: torch.optim.Optimizer, *_) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        seen.append({"lr": optimizer.param_groups[0]["lr"], "norm": float(norm)})

    engine.optimizer.register_step_pre_hook(hook)
    return seen


def test_the_default_settings_train_exactly_as_the_loop_did_before_them() -> None:
    engine, history = _train(CONFIG)
    # The step before these settings existed: Adam, zero_grad, backward, step; same batches.
    model = _model()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=CONFIG.lr, weight_decay=CONFIG.weight_decay)
    x, y = (torch.from_numpy(a) for a in _data())
    generator = torch.Generator().manual_seed(CONFIG.seed)
    losses = []
    for _ in range(CONFIG.steps):
        batch = torch.randint(0, len(y), (CONFIG.batch_size,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert [h["loss"] for h in history] == losses
    for name, value in engine.model_state().items():
        assert torch.equal(value, dict(model.named_parameters())[name].detach()), name


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warmup_then_the_schedule_gives_the_expected_lr_at_every_step(schedule: str) -> None:
    config = replace(CONFIG, steps=10, lr=0.1, lr_schedule=schedule, warmup_steps=4)
    engine = TorchEngine(_model(), config)
    seen = _record_steps(engine)
    fit(engine, *_data(), config, "t")
    expected = []
    for step in range(10):
        if step < 4:
            expected.append(0.1 * step / 4)
            continue
        progress = (step - 4) / 6
        decay = {
            "linear": 1 - progress,
            "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
            "constant": 1.0,
        }
        expected.append(0.1 * decay[schedule])
    assert [s["lr"] for s in seen] == pytest.approx(expected, abs=1e-12)


def test_a_constant_rate_without_warmup_imports_no_transformers() -> None:
    """The default schedule is a factor of 1 at every step; transformers (about 3 CPU-seconds
    of import in every fine-tune process) is only imported for the others."""
    code = (
        "import sys, torch\n"
        "from workers.finetune import TrainConfig\n"
        "from workers.finetune.settings import make_scheduler\n"
        "model = torch.nn.Linear(2, 2)\n"
        "for schedule, warmup in (('constant', 0), ('constant', 2)):\n"
        "    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "    config = TrainConfig(steps=5, batch_size=1, lr=0.1, warmup_steps=warmup)\n"
        "    scheduler = make_scheduler(optimizer, config)\n"
        "    rates = []\n"
        "    for _ in range(5):\n"
        "        rates.append(optimizer.param_groups[0]['lr'])\n"
        "        optimizer.step()\n"
        "        scheduler.step()\n"
        "    print(rates, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.splitlines() == [
        "[0.1, 0.1, 0.1, 0.1, 0.1] False",
        "[0.0, 0.05, 0.1, 0.1, 0.1] True",
    ]


def test_two_micro_batches_of_b_step_as_one_batch_of_2b() -> None:
    whole, whole_history = _train(replace(CONFIG, steps=8, batch_size=16))
    accumulated = replace(CONFIG, steps=8, batch_size=16, grad_accumulation=2)
    engine = TorchEngine(_model(), accumulated)
    seen = _record_steps(engine)
    history = fit(engine, *_data(), accumulated, "t")
    assert len(seen) == 8  # one optimizer step per 2 micro-batches of 8
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in whole_history])
    expected, state = whole.model_state(), engine.model_state()
    assert any(
        (value - _model().state_dict()[name]).abs().max() > 1e-3 for name, value in expected.items()
    )
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)


def test_a_batch_that_does_not_split_into_micro_batches_is_refused() -> None:
    config = replace(CONFIG, batch_size=16, grad_accumulation=3)
    with pytest.raises(MergelineError, match="grad_accumulation"):
        fit(TorchEngine(_model(), config), *_data(), config, "t")


def test_clipping_bounds_the_gradient_the_optimizer_steps_with() -> None:
    free = TorchEngine(_model(), CONFIG)
    free_steps = _record_steps(free)
    fit(free, *_data(), CONFIG, "t")
    assert max(s["norm"] for s in free_steps) > 0.05  # so the bound below bites
    clipped_config = replace(CONFIG, max_grad_norm=0.05)
    clipped = TorchEngine(_model(), clipped_config)
    clipped_steps = _record_steps(clipped)
    fit(clipped, *_data(), clipped_config, "t")
    assert max(s["norm"] for s in clipped_steps) <= 0.05 * (1 + 1e-5)
    changed = [
        (clipped.model_state()[k] - v).abs().max() > 1e-6 for k, v in free.model_state().items()
    ]
    assert any(changed)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_close_to_fp32_but_not_equal(precision: str) -> None:
    full, full_history = _train(CONFIG)
    engine, history = _train(replace(CONFIG, precision=precision))
    assert np.mean([h["loss"] for h in history[-5:]]) < history[0]["loss"] - 0.1
    state = engine.model_state()
    assert all(value.dtype == torch.float32 for value in state.values())  # fp32 weights
    differences = [(state[k] - v).abs().max().item() for k, v in full.model_state().items()]
    assert 0 < max(differences) < 0.05
    assert ("scaler" in engine.step_state()) == (precision == "fp16")


def test_linear_mode_trains_under_autocast() -> None:
    """Forward-mode AD (the linearized model's jvp) runs under bf16 autocast on CPU."""
    from workers.finetune import LinearizedModel

    results = {}
    for precision in ("fp32", "bf16"):
        model = _model()
        theta0 = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
        linear = Classifier(LinearizedModel(model.backbone, theta0), model.head)
        config = replace(CONFIG, precision=precision)
        engine = TorchEngine(linear, config)
        history = fit(engine, *_data(), config, "t")
        assert history[-1]["loss"] < history[0]["loss"] - 0.1
        results[precision] = engine.model_state()
    differences = [(results["bf16"][k] - v).abs().max().item() for k, v in results["fp32"].items()]
    assert 0 < max(differences) < 0.05


def test_a_resume_continues_the_schedule_and_the_loss_scale_exactly() -> None:
    config = replace(CONFIG, precision="fp16", lr_schedule="cosine", warmup_steps=5)
    straight, straight_history = _train(config)
    saved: list[TrainState] = []
    _train(replace(config), checkpoint_every=12, on_checkpoint=saved.append)
    files = encode_state(saved[0], {"task": "t"})
    state, _ = decode_state(files, "checkpoint")
    assert state.step == 12 and state.step_state == saved[0].step_state
    assert set(state.step_state) == {"scheduler", "scaler"}
    assert state.step_state["scheduler"]["last_epoch"] == 12
    resumed = TorchEngine(_model(), config)
    history = fit(resumed, *_data(), config, "t", start=state)
    assert history == straight_history
    for name, value in straight.model_state().items():
        assert torch.equal(resumed.model_state()[name], value), name
    # Without the scheduler's state the resumed run would restart its warmup: not the same run.
    forgetful = TorchEngine(_model(), config)
    fit(forgetful, *_data(), config, "t", start=replace(state, step_state={}))
    assert any(
        not torch.equal(forgetful.model_state()[k], v) for k, v in straight.model_state().items()
    )


def test_gradient_checkpointing_needs_a_model_that_supports_it() -> None:
    with pytest.raises(MergelineError, match="gradient_checkpointing needs a Hugging Face"):
        TorchEngine(_model(), replace(CONFIG, gradient_checkpointing=True))


def test_gradient_checkpointing_recomputes_a_hugging_face_model_to_the_same_step() -> None:
    loss = get_kind("causal_lm").loss
    rng = np.random.default_rng(0)
    x = np.zeros((16, 3, 10), dtype=np.int64)
    x[:, 0] = rng.integers(4, 40, size=(16, 10))
    x[:, 1], x[:, 2, -3:] = 1, 1
    y = np.zeros(16, dtype=np.int64)
    config = TrainConfig(steps=3, batch_size=8, lr=1e-2)
    results = []
    for checkpointing in (False, True):
        model = CausalLM(tiny_llama())
        engine = TorchEngine(
            model, replace(config, gradient_checkpointing=checkpointing), loss_fn=loss
        )
        model.train()
        fit(engine, x, y, config, "t")
        results.append(engine.model_state())
    lm = next(m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable"))
    assert getattr(lm, "is_activation_checkpointing", None) or lm.is_gradient_checkpointing
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6)
    enable_gradient_checkpointing(CausalLM(tiny_llama()))  # idempotent, no error


def test_deepspeed_refuses_fp16_where_its_accelerator_has_none() -> None:
    from workers.finetune.deepspeed_engine import DeepSpeedEngine, import_deepspeed

    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this accelerator has fp16")
    with pytest.raises(MergelineError, match="use bf16 on CPU"):
        DeepSpeedEngine(_model(), replace(CONFIG, precision="fp16"), 2)

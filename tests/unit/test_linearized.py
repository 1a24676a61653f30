"""The linearized model: first-order exactness, training δ only, task vectors, spec rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.spec.load import validate_document
from pipelines.spec.search import resolve_search
from storage.errors import ArtifactError, SpecError
from tests.conftest import TINY_SPEC
from workers.finetune import (
    LinearizedModel,
    TrainConfig,
    jvp_outputs,
    linearized_forward,
    pack_linearized,
    train,
    unpack_linearized,
)
from workers.models import build_backbone, fit_linear_probe
from workers.search.evaluate import features_at, linearized_accuracy

CONFIG = {"source": "builtin", "name": "mlp", "hidden": [16], "features": 4, "seed": 0}


def _model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    backbone = build_backbone(CONFIG, 6)
    return backbone, {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def _direction(theta0: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in theta0.items()}


def _data(n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] * x[:, 1] + x[:, 2] > 0).astype(np.int64)


def test_zero_direction_is_the_base_model_and_the_error_is_second_order() -> None:
    backbone, theta0 = _model()
    x = torch.randn(32, 6)
    zero = {k: torch.zeros_like(v) for k, v in theta0.items()}
    assert torch.allclose(linearized_forward(backbone, theta0, zero, x), backbone(x), atol=1e-6)
    delta = _direction(theta0, 1)
    errors = []
    for eps in (1e-1, 5e-2, 2.5e-2):
        scaled = {k: eps * v for k, v in delta.items()}
        exact = features_at(backbone, {k: theta0[k] + scaled[k] for k in theta0}, x)
        errors.append(float((exact - linearized_forward(backbone, theta0, scaled, x)).norm()))
    # Taylor: the remainder shrinks ~4x when the step halves (a first-order error would halve).
    assert errors[0] / errors[1] > 3.0 and errors[1] / errors[2] > 3.0


def test_the_linearized_model_is_linear_in_the_direction() -> None:
    backbone, theta0 = _model()
    x = torch.randn(16, 6)
    d1, d2 = _direction(theta0, 1), _direction(theta0, 2)
    base, t1 = jvp_outputs(backbone, theta0, d1, x)
    _, t2 = jvp_outputs(backbone, theta0, d2, x)
    mixed = {k: 0.3 * d1[k] - 1.7 * d2[k] for k in theta0}
    assert torch.allclose(
        linearized_forward(backbone, theta0, mixed, x), base + 0.3 * t1 - 1.7 * t2, atol=1e-5
    )
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in theta0.items())


def test_training_the_linearized_model_moves_only_delta_and_is_deterministic() -> None:
    x, y = _data()
    vectors = []
    for _ in range(2):
        backbone, theta0 = _model()
        head = fit_linear_probe(features_at(backbone, theta0, x).numpy(), y, 2)
        zero = {k: torch.zeros_like(v) for k, v in theta0.items()}
        before = linearized_accuracy(backbone, theta0, zero, head, x, y)
        model = LinearizedModel(backbone, theta0)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [
            f"delta.{i}" for i in range(len(theta0))
        ]
        history = train(model, head, x, y, TrainConfig(150, 32, 1e-2), "t")
        delta = model.task_vector()
        assert list(delta) == list(theta0)
        assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in theta0.items())
        assert history[-1]["loss"] < history[0]["loss"]
        after = linearized_accuracy(backbone, theta0, delta, head, x, y)
        assert after > before
        with torch.no_grad():  # the module's forward is exactly the linearized forward at δ
            assert torch.equal(
                model(torch.from_numpy(x)),
                linearized_forward(backbone, theta0, delta, torch.from_numpy(x)),
            )
        vectors.append(delta)
    assert all(torch.equal(vectors[0][k], vectors[1][k]) for k in vectors[0])


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor([2.0, 0.5, 1.0]))
        self.register_buffer("steps", torch.tensor(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x * self.scale))


def test_buffers_stay_at_theta0_and_get_zero_task_vector_entries() -> None:
    module = _WithBuffer()
    theta0 = {k: v.clone() for k, v in module.state_dict().items()}
    model = LinearizedModel(module, theta0)
    with torch.no_grad():
        for parameter in model.delta:
            parameter.add_(0.1)
    delta = model.task_vector()
    assert set(delta) == set(theta0)
    assert torch.equal(delta["scale"], torch.zeros(3)) and int(delta["steps"]) == 0
    assert torch.allclose(delta["linear.weight"], torch.full((2, 3), 0.1))
    x = torch.randn(4, 3)
    assert torch.allclose(model(x), linearized_forward(module, theta0, delta, x))


def test_pack_and_unpack_round_trip_and_refuse_a_mixed_file() -> None:
    _, theta0 = _model()
    theta = {k: v + 1.0 for k, v in theta0.items()}
    packed = pack_linearized(theta0, theta)
    base, delta = unpack_linearized(packed)
    assert all(torch.equal(base[k], theta0[k]) for k in theta0)
    assert all(torch.allclose(delta[k], torch.ones_like(v)) for k, v in theta0.items())
    with pytest.raises(ArtifactError, match="base"):
        unpack_linearized(packed | {"layers.0.weight": theta0["layers.0.weight"]})


def _spec(**changes: object) -> dict:
    document = copy.deepcopy(TINY_SPEC)
    for dotted, value in changes.items():
        node = document
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return document


def test_linear_mode_refuses_zero_stage_3_with_a_clear_error() -> None:
    with pytest.raises(SpecError, match=r"finetune.*linear.*zero_stage 0, 1 or 2"):
        validate_document(_spec(finetune__mode="linear", finetune__deepspeed={"zero_stage": 3}))
    spec = validate_document(_spec(finetune__mode="linear", finetune__deepspeed={"zero_stage": 2}))
    assert spec.finetune.mode == "linear"
    assert validate_document(_spec(finetune__deepspeed={"zero_stage": 3})).finetune.deepspeed


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"merge__objective": "negate"}, "go together"),
        (
            {"merge__objective": "negate", "merge__negate": {"target": "perm1", "control": "x"}},
            "merge.negate.control",
        ),
        (
            {
                "merge__objective": "negate",
                "merge__negate": {"target": "perm1", "control": "perm1"},
            },
            "must differ",
        ),
        (
            {"finetune__mode": "linear", "merge__search": {"surrogate": "posthoc_linear"}},
            "fast path is exact",
        ),
        (
            {
                "merge__search": {"per_task": True},
                "merge__candidates": [{"method": "weight_average"}],
            },
            "per-task",
        ),
        (
            {
                "merge__search": {"surrogate": "posthoc_linear"},
                "merge__candidates": [{"method": "ties"}],
            },
            "linear in the task vectors",
        ),
    ],
)
def test_search_and_negation_rules_name_the_field(changes: dict, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        validate_document(_spec(**changes))


def test_per_task_coordinate_ascent_is_the_default_in_linear_mode_only() -> None:
    linear = resolve_search(validate_document(_spec(finetune__mode="linear")))
    assert (linear.per_task, linear.strategy, linear.fast_path) == (True, "coordinate_ascent", True)
    standard = resolve_search(validate_document(_spec()))
    assert (standard.per_task, standard.strategy, standard.tangent) == (False, "grid", False)
    off = resolve_search(validate_document(_spec(finetune__mode="linear", merge__fast_path="off")))
    assert (off.per_task, off.strategy, off.fast_path) == (False, "grid", False)
    ties = _spec(finetune__mode="linear")
    ties["merge"]["candidates"].append({"method": "ties", "params": {"density": 0.5}})
    assert resolve_search(validate_document(ties)).per_task is False

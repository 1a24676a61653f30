"""LoRA task vectors: PEFT adapters on a tiny Llama and an MLP, their factors, tangent-space LoRA.

Every check compares two independent computations in float32: a PEFT model's own forward
against the base network at θ0 + s·B·A, a linearized adapter model (jvp in φ) against the
weight-space linearization at τ, factor-space merges against dense ones, and the causal-LM fast
path against real forward passes of the linearized adapter model.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from storage.errors import ArtifactError, MergeInputError, ModelError
from tests.lm_fixtures import tiny_llama
from tests.unit.test_lm_fastpath import VOCAB, packed_split, relative_error
from workers.adapters import (
    Factor,
    LoraDelta,
    concat_factors,
    factors_from_tensors,
    factors_to_tensors,
    frozen_outside_adapter,
    lora_trainable,
    trained_factors,
    with_lora,
    without_lora,
)
from workers.adapters.lora import adapter_names
from workers.finetune.linearized import LinearizedModel, linearized_forward
from workers.merge import merge
from workers.merge.compression import compress_tall
from workers.merge.engine import merge_state
from workers.models import build_backbone
from workers.models.causal_lm import CausalLM
from workers.search.lm_fastpath import build_lm_fast_path
from workers.search.lm_metrics import completion_logits

SETTINGS = {"r": 2, "alpha": 4.0}
Q = "lm.model.layers.0.self_attn.q_proj.weight"


def llama() -> CausalLM:
    return CausalLM(tiny_llama(0, VOCAB))


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Move the adapter off its start (B = 0), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


def test_peft_adapts_the_architecture_default_modules_and_only_they_train() -> None:
    network = llama()
    adapted = with_lora(network, SETTINGS, seed=0)
    names = adapter_names(adapted)
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)  # PEFT's Llama default
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == set(names)
    assert not any(".lora_" in n for n, _ in network.named_parameters())  # a copy was adapted
    again = with_lora(network, SETTINGS, seed=0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(adapted.state_dict().values(), again.state_dict().values(), strict=True)
    )
    mlp = build_backbone(
        {"source": "builtin", "name": "mlp", "hidden": [8, 8], "features": 4, "seed": 0}, 6
    )
    layers = {n.split(".lora_")[0] for n in adapter_names(with_lora(mlp, SETTINGS))}
    assert layers == {n for n, m in mlp.named_modules() if isinstance(m, torch.nn.Linear)}
    with pytest.raises(ModelError, match="finetune.adapter.target_modules"):
        with_lora(network, SETTINGS | {"target_modules": ["no_such_module"]})


def test_a_trained_adapter_is_the_base_network_at_theta0_plus_s_b_a() -> None:
    network = llama()
    theta0 = network.state_dict()
    adapted = with_lora(network, SETTINGS | {"target_modules": ["q_proj", "o_proj", "down_proj"]})
    randomize(adapted, seed=1)
    factors = trained_factors(adapted, {})
    assert Q in factors and factors[Q].scale == 2.0 and factors[Q].rank == 2
    delta = LoraDelta(factors, theta0)
    assert list(delta) == list(theta0) and Q in delta and "lm.model.norm.weight" in delta
    assert not delta["lm.model.norm.weight"].any()
    packed = packed_split(0, 1, 6)
    with torch.no_grad():
        want = adapted(packed)
        state = {name: theta0[name] + delta[name] for name in theta0}
        got = functional_call(network, state, (packed,))
    assert relative_error(got, want) < 1e-5


def test_an_adapter_trained_in_place_is_read_then_removed_leaving_the_base_at_theta0() -> None:
    """How a one-worker fine-tune holds the base once: LoRA in the base's own modules, its
    factors read, then the layers put back, the weights θ0 as they were (same tensors)."""
    network = llama()
    theta0 = {name: t.clone() for name, t in network.state_dict().items()}
    q_weight = network.get_submodule("lm.model.layers.0.self_attn.q_proj").weight
    adapted = with_lora(network, SETTINGS, seed=0, in_place=True)
    assert adapted is network and adapter_names(network)
    randomize(adapted, seed=1)
    factors = trained_factors(adapted, {})
    assert without_lora(network) is network
    assert not any(".lora_" in n for n, _ in network.named_parameters())
    assert network.get_submodule("lm.model.layers.0.self_attn.q_proj").weight is q_weight
    assert type(network.get_submodule("lm.model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert list(network.state_dict()) == list(theta0)
    assert all(torch.equal(network.state_dict()[n], t) for n, t in theta0.items())
    packed = packed_split(0, 1, 6)
    with torch.no_grad():  # the plain network at θ0 + τ is the adapter's forward (a copy)
        delta = LoraDelta(factors, theta0)
        state = {name: theta0[name] + delta[name] for name in theta0}
        reference = with_lora(llama(), SETTINGS, seed=0)
        randomize(reference, seed=1)
        assert relative_error(functional_call(network, state, (packed,)), reference(packed)) < 1e-5


def test_tangent_space_lora_is_the_weight_space_linearization_at_its_task_vector() -> None:
    """f(θ0, φ0) + J_φ f·δφ == f(θ0) + J_W f·τ with τ = s·(δB·A0 + B0·δA), for B0 = 0 (PEFT's
    init: rank r) and B0 ≠ 0 (rank 2r)."""
    network = llama()
    theta0 = network.state_dict()
    packed = packed_split(1, 2, 6)
    for moved_start in (False, True):
        adapted = with_lora(network, SETTINGS, seed=3)
        if moved_start:
            randomize(adapted, seed=4, scale=0.3)
        start = adapted.state_dict()
        linear = LinearizedModel(adapted, start, frozen_outside_adapter(adapted))
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in linear.delta:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)  # δA and δB both move
        factors = trained_factors(adapted, linear.base_state(), linear.task_vector())
        assert {f.rank for f in factors.values()} == {4 if moved_start else 2}
        tau = dict(LoraDelta(factors, theta0))
        with torch.no_grad():
            want = linear(packed)
            base = functional_call(network, theta0, (packed,))
            if moved_start:  # the expansion point is θ0 + s·B0·A0, not θ0
                start_delta = LoraDelta(trained_factors(adapted, {}), theta0)
                theta0 = {n: theta0[n] + start_delta[n] for n in theta0}
            got = linearized_forward(network, theta0, tau, packed)
        assert relative_error(got, want) < 1e-5
        assert relative_error(want, base) > 1e-3  # the adapter changed the outputs
        theta0 = network.state_dict()


def test_factors_round_trip_and_a_broken_file_is_refused() -> None:
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    factors = {"layer.weight": Factor(a, b, 0.5)}
    tensors = factors_to_tensors(factors)
    assert set(tensors) == {"layer.weight.lora_A", "layer.weight.lora_B", "layer.weight.lora_scale"}
    back = factors_from_tensors(tensors, "x")["layer.weight"]
    assert torch.equal(back.a, a) and torch.equal(back.b, b) and back.scale == 0.5
    del tensors["layer.weight.lora_B"]
    with pytest.raises(ArtifactError, match="lora_B"):
        factors_from_tensors(tensors, "x")
    with pytest.raises(MergeInputError, match="does not have"):
        LoraDelta({"other.weight": Factor(a, b, 1.0)}, {"layer.weight": torch.zeros(3, 5)})
    with pytest.raises(MergeInputError, match="shape"):
        LoraDelta(factors, {"layer.weight": torch.zeros(5, 3)})


def test_linear_merges_are_exact_in_factor_space_and_every_method_streams_the_factors() -> None:
    theta0 = {"w": torch.randn(6, 5), "u": torch.randn(4, 6), "bias": torch.randn(6)}
    generator = torch.Generator().manual_seed(0)

    def factor(rows: int, cols: int, r: int) -> Factor:
        return Factor(
            torch.randn(r, cols, generator=generator),
            torch.randn(rows, r, generator=generator),
            0.5,
        )

    tasks = {
        "a": {"w": factor(6, 5, 2), "u": factor(4, 6, 2)},
        "b": {"w": factor(6, 5, 3)},  # adapts w only
    }
    views = {t: LoraDelta(f, theta0) for t, f in tasks.items()}
    alphas = {"a": 0.7, "b": -0.4}
    combined = concat_factors(tasks, alphas)
    assert combined["w"].rank == 5 and combined["u"].rank == 2
    dense = merge("task_arithmetic", theta0, {t: dict(v) for t, v in views.items()}, alphas)
    for name, factor_ in combined.items():
        assert torch.allclose(theta0[name] + factor_.delta(), dense[name], atol=1e-5)
    assert torch.equal(dense["bias"], theta0["bias"])
    for method, params in (
        ("task_arithmetic", {}),
        ("ties", {"density": 0.5}),
        ("dare", {"p": 0.3, "seed": 1}),
        ("consensus", {}),
    ):
        want = merge(method, theta0, {t: dict(v) for t, v in views.items()}, 0.6, **params)
        got = merge_state(method, theta0, views, 0.6, **params)
        assert set(got) == set(want)
        assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want), method
    dense = {t: dict(v) for t, v in views.items()}  # a retrieval method: one model per task
    want = merge("tall_masks", theta0, dense, 1.0, task="b", lam=0.4)
    got = merge_state("tall_masks", theta0, views, 1.0, task="b", lam=0.4)
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    packed, plain = compress_tall(theta0, views, 0.4), compress_tall(theta0, dense, 0.4)
    assert all(torch.equal(packed.masks["b"][n], plain.masks["b"][n]) for n in theta0)


def test_the_lm_fast_path_is_exact_for_tangent_space_lora() -> None:
    """Fast-path logits for α == a real forward of the LoRA-linearized model at φ0 + Σ α_t δφ_t."""
    network = llama()
    theta0 = network.state_dict()
    adapted = with_lora(network, SETTINGS, seed=0)
    start = adapted.state_dict()
    linear = LinearizedModel(adapted, start, frozen_outside_adapter(adapted))
    generator = torch.Generator().manual_seed(7)
    deltas, vectors = {}, {}
    for task in ("a", "b"):
        deltas[task] = {
            name: torch.randn(p.shape, generator=generator) * 0.5
            for name, p in zip(linear.names, linear.delta, strict=True)
        }
        full = {n: deltas[task].get(n, torch.zeros_like(v)) for n, v in start.items()}
        vectors[task] = LoraDelta(trained_factors(adapted, start, full), theta0)
    inputs = {"a": packed_split(0, 1, 8), "b": packed_split(1, 2, 8)}
    fast = build_lm_fast_path(network, theta0, vectors, inputs, 4)
    for alphas in ({"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 0.5}, {"a": -0.3, "b": 1.7}):
        with torch.no_grad():
            for p, name in zip(linear.delta, linear.names, strict=True):
                p.copy_(sum(alphas[t] * deltas[t][name] for t in deltas))
            for task, packed in inputs.items():
                want, tokens = completion_logits(linear(packed), packed)
                got = fast.logits_for(torch.tensor([alphas[s] for s in fast.vectors]), task)
                assert torch.equal(fast.targets[task], tokens) and got.shape == want.shape
                assert relative_error(got, want) < 1e-5


def test_an_adapter_fine_tune_resumes_from_its_checkpoint_exactly() -> None:
    """Checkpoints hold the adapter's parameters and optimizer state only; resuming from one
    gives the adapter of an uninterrupted run, in both modes."""
    import numpy as np

    from workers.finetune import TrainConfig
    from workers.finetune.engine import TorchEngine
    from workers.finetune.loop import fit
    from workers.kinds import get_kind

    x = packed_split(3, 1, 24).numpy()
    y = np.zeros(len(x), dtype=np.int64)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2)
    loss = get_kind("causal_lm").loss

    def trainable(mode: str) -> torch.nn.Module:
        return lora_trainable(llama(), SETTINGS, mode)

    for mode in ("standard", "linear"):
        straight = TorchEngine(trainable(mode), config, loss_fn=loss)
        fit(straight, x, y, config, "t")
        saved = []
        first = TorchEngine(trainable(mode), config, loss_fn=loss)
        fit(first, x, y, config, "t", checkpoint_every=3, on_checkpoint=saved.append)
        state = saved[0]
        assert state.step == 3 and all(
            ".lora_" in n or n.startswith("delta.") for n in state.shards.shapes
        )
        resumed = TorchEngine(trainable(mode), config, loss_fn=loss)
        fit(resumed, x, y, config, "t", start=state)
        want, got = straight.model_state(), resumed.model_state()
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want), mode


@pytest.mark.parametrize(
    ("method", "params"),
    [("task_arithmetic", {}), ("ties", {"density": 0.3}), ("ties", {"scope": "per_tensor"})],
)
def test_adapter_task_vectors_merge_large_weights_in_blocks_of_rows(
    monkeypatch, method, params
) -> None:
    """A weight over the engine's block size (an LLM's embedding) is merged by rows with
    adapter task vectors too: each block reads s·B[rows]·A, never the whole ΔW (the 1B run's
    ties scorer held all T dense embeddings at once), and the result is the whole one's."""
    from workers.merge import blocks
    from workers.merge.engine import StateSource, merge_stream, plan_merge, specs_of

    generator = torch.Generator().manual_seed(3)
    theta0 = {"emb": torch.randn(40, 6), "w": torch.randn(6, 5), "bias": torch.randn(6)}
    tasks = {
        t: {
            name: Factor(
                torch.randn(2, theta0[name].shape[1], generator=generator),
                torch.randn(theta0[name].shape[0], 2, generator=generator),
                0.5,
            )
            for name in names
        }
        for t, names in (("a", ("emb", "w")), ("b", ("emb",)), ("c", ("w",)))
    }
    views = {t: LoraDelta(f, theta0) for t, f in tasks.items()}
    coefficient = 0.7
    want = merge(method, theta0, {t: dict(v) for t, v in views.items()}, coefficient, **params)

    read_whole: list[str] = []
    for view in views.values():  # a whole read of the large weight fails the test
        whole = view.read
        monkeypatch.setattr(
            view,
            "read",
            lambda name, out=None, whole=whole: read_whole.append(name) or whole(name, out),
        )
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 6 * 8)  # 8 rows of emb per block
    plan = plan_merge(
        method, specs_of(theta0), {t: specs_of(theta0) for t in views}, coefficient, params
    )
    got = {name: t.clone() for name, t in merge_stream(plan, StateSource(theta0), views)}
    assert "emb" not in read_whole
    for name in theta0:
        assert torch.equal(got[name], want[name]), (method, name)

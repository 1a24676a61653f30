"""LoRA adapters on any network through PEFT, and the factors a fine-tune leaves.

``with_lora`` copies the network and injects PEFT LoRA layers (``peft.inject_adapter_in_model``)
into the target modules; PEFT freezes everything else. The adapter's start φ0 (A drawn by
PEFT's initialiser, B = 0) depends only on the seed, so every worker, a resumed run and the
stage that rebuilds the model after training all get the same φ0.

Task vectors, in the base network's weight names (:class:`~workers.adapters.factors.Factor`):

- **standard** mode trains φ = (A, B): ΔW = s·B·A.
- **linear** mode (tangent-space LoRA, Tang et al., ICLR 2024) trains the linearization in φ
  only, f(x; θ0, φ0) + J_φ f(x; θ0, φ0)·(φ − φ0). The adapter enters the weight as
  W = W0 + s·B·A, whose differential at φ0 is s·(dB·A0 + B0·dA), so
  J_φ f·(φ − φ0) = J_W f(x; θ0)·τ with τ = s·(δB·A0 + B0·δA), exactly. That τ is the weight-space
  task vector: the linearized adapter model *is* the weight-space linearization at θ0 + τ, so
  every merge method takes τ and the existing linear-mode search and fast path score what the
  model computes. With PEFT's init (B0 = 0) the gradient of A is zero, δA stays 0 and
  τ = s·δB·A0: a LoRA factor pair of rank r (rank 2r in general: [δB, B0]·[A0; δA]).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from storage.errors import ModelError
from workers.adapters.factors import Factor

ADAPTER = "default"  # PEFT's adapter name: one adapter per task vector


def _model_type(network: nn.Module) -> str | None:
    for module in network.modules():
        config = getattr(module, "config", None)
        model_type = getattr(config, "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def default_target_modules(network: nn.Module) -> list[str]:
    """PEFT's default modules for the architecture; every linear layer of a model without one
    (a builtin MLP)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = _model_type(network)
    if model_type is None:
        return [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise ModelError(
            f"finetune.adapter.target_modules: PEFT has no default for model type "
            f"{model_type!r}: name the modules to adapt (e.g. [q_proj, v_proj])"
        )
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


def lora_config(settings: Mapping[str, Any], network: nn.Module):
    """PEFT's LoraConfig for the spec's ``finetune.adapter`` section on ``network``."""
    from peft import LoraConfig

    targets = settings.get("target_modules") or default_target_modules(network)
    return LoraConfig(
        r=int(settings.get("r", 16)),
        lora_alpha=float(settings.get("alpha", 32.0)),
        lora_dropout=float(settings.get("dropout", 0.0)),
        target_modules=list(targets),
        bias="none",
    )


def with_lora(
    network: nn.Module, settings: Mapping[str, Any], seed: int = 0, in_place: bool = False
) -> nn.Module:
    """A copy of ``network`` (or ``network`` itself, ``in_place``: no second copy of the base
    in memory) with LoRA on the target modules; only the adapter trains."""
    from peft import inject_adapter_in_model

    config = lora_config(settings, network)
    model = network if in_place else copy.deepcopy(network)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        except ValueError as error:  # PEFT: no target module found, or one it cannot adapt
            raise ModelError(
                f"finetune.adapter.target_modules {sorted(config.target_modules)}: "
                f"{str(error).splitlines()[0]}"
            ) from None
    layers = _lora_layers(model)
    if not layers:
        raise ModelError(
            f"finetune.adapter.target_modules {sorted(config.target_modules)} match no module "
            "of the model: name linear layers of the base"
        )
    for name, layer in layers.items():
        if not isinstance(layer.get_base_layer(), nn.Linear):
            raise ModelError(
                f"finetune.adapter.target_modules: '{name}' is a "
                f"{type(layer.get_base_layer()).__name__}; adapters go on linear layers only"
            )
    return model


def lora_trainable(
    network: nn.Module,
    settings: Mapping[str, Any],
    mode: str,
    seed: int = 0,
    in_place: bool = False,
) -> nn.Module:
    """What trains an adapter: the LoRA network (standard mode), or its linearization in the
    adapter's parameters only, around φ0 (linear mode: tangent-space LoRA)."""
    from workers.finetune.linearized import LinearizedModel

    adapted = with_lora(network, settings, seed, in_place=in_place)
    if mode != "linear":
        return adapted
    return LinearizedModel(adapted, adapted.state_dict(), frozen_outside_adapter(adapted))


def without_lora(model: nn.Module) -> nn.Module:
    """``model`` with each LoRA layer put back to the layer it wraps (PEFT's base layer, whose
    weights the adapter never changed): undoes :func:`with_lora` ``in_place`` once the adapter's
    factors have been read. Returns ``model``."""
    for name, layer in _lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    return model


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """The adapter's parameter names in ``model`` (``<module>.lora_A.default.weight``, ...)."""
    return [name for name, p in model.named_parameters() if ".lora_" in name and p.requires_grad]


def frozen_outside_adapter(model: nn.Module) -> set[str]:
    """Every floating-point parameter but the adapter's: what linear mode keeps at θ0."""
    adapter = set(adapter_names(model))
    return {
        name
        for name, p in model.named_parameters()
        if p.is_floating_point() and name not in adapter
    }


def _parts(module: str) -> tuple[str, str]:
    return f"{module}.lora_A.{ADAPTER}.weight", f"{module}.lora_B.{ADAPTER}.weight"


def trained_factors(
    model: nn.Module,
    phi0: Mapping[str, Tensor],
    delta: Mapping[str, Tensor] | None = None,
) -> dict[str, Factor]:
    """The task vector of a trained adapter as factors under the base weights' names.

    ``model`` holds the LoRA layers (names as ``with_lora`` made them) and ``phi0`` their
    parameters at the start. Standard mode (``delta`` None): the model's trained A, B.
    Linear mode: ``delta`` holds φ − φ0 under the same names, and the factors are the
    first-order change s·(δB·A0 + B0·δA) (see the module docstring).
    """
    factors = {}
    for module, layer in _lora_layers(model).items():
        name_a, name_b = _parts(module)
        scale = float(layer.scaling[ADAPTER])
        if delta is None:
            a = layer.lora_A[ADAPTER].weight.detach().float().clone()
            b = layer.lora_B[ADAPTER].weight.detach().float().clone()
        else:
            a0, b0 = phi0[name_a].float(), phi0[name_b].float()
            da, db = delta[name_a].float(), delta[name_b].float()
            if bool((b0 == 0).all()):  # PEFT's init: δA is exactly zero, τ = s·δB·A0
                a, b = a0.clone(), db.clone()
            else:
                a, b = torch.cat([a0, da], dim=0), torch.cat([db, b0], dim=1)
        factors[f"{module}.weight"] = Factor(a, b, scale)
    return factors

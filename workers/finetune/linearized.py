"""The linearized model: the first-order Taylor expansion of a network around θ0.

Ortiz-Jiménez et al. 2023, "Task Arithmetic in the Tangent Space: Improved Editing of
Pre-Trained Models" (NeurIPS): f_lin(x; θ) = f(x; θ0) + J_θ f(x; θ0) · (θ − θ0). Fine-tuning
f_lin instead of f keeps the model linear in its weights, so task vectors add without
interfering and merged logits are affine in the merge coefficients (see `workers.search.fastpath`).

Everything here is pure torch over ``dict[str, Tensor]``: one `torch.func.jvp` over
`torch.func.functional_call` gives f(x; θ0) and J f(x; θ0) · δ in one pass. Only floating-point
*parameters* are linearized; buffers (and integer tensors) stay at their θ0 values and their
task-vector entries are zero, as are those of the *frozen* parameters a caller names (e.g. a
causal LM's output head, which the LM fast path needs fixed).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from storage.errors import ArtifactError, ModelError

StateDict = dict[str, Tensor]


def tangent_names(module: nn.Module, frozen: Collection[str] = ()) -> list[str]:
    """The names jvp differentiates through: the floating-point parameters not in ``frozen``."""
    return [
        name
        for name, p in module.named_parameters()
        if p.is_floating_point() and name not in frozen
    ]


def jvp_outputs(
    module: nn.Module,
    theta0: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    frozen: Collection[str] = (),
) -> tuple[Tensor, Tensor]:
    """(f(x; θ0), J f(x; θ0) · δ) in one forward-mode pass.

    ``theta0`` holds the module's full state (parameters and buffers) under the original names;
    ``delta`` holds a direction for each parameter (missing names count as zero). ``frozen``
    parameters are constants: their direction is zero (any in ``delta`` is ignored) and costs
    nothing. The module's own weights are never read or modified.
    """
    names = tangent_names(module, frozen)
    primals = {name: theta0[name] for name in names}
    tangents = {
        name: delta[name].to(primals[name].dtype)
        if name in delta
        else torch.zeros_like(primals[name])
        for name in names
    }
    constants = {name: value for name, value in theta0.items() if name not in primals}
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def forward(parameters: dict[str, Tensor]) -> Tensor:
        return functional_call(module, {**constants, **parameters}, args)

    return jvp(forward, (primals,), (tangents,))


def jvp_many(
    module: nn.Module,
    theta0: Mapping[str, Tensor],
    deltas: list[Mapping[str, Tensor]],
    inputs: Tensor | tuple[Tensor, ...],
    frozen: Collection[str] = (),
) -> tuple[Tensor, Tensor]:
    """(f(x; θ0), stacked J f(x; θ0) · δ_s for every s): one vmapped jvp shares the primal.

    ``frozen`` as in :func:`jvp_outputs`.
    """
    names = tangent_names(module, frozen)
    primals = {name: theta0[name] for name in names}
    stacked = {
        name: torch.stack(
            [
                d[name].to(primals[name].dtype) if name in d else torch.zeros_like(primals[name])
                for d in deltas
            ]
        )
        for name in names
    }
    constants = {name: value for name, value in theta0.items() if name not in primals}
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def forward(parameters: dict[str, Tensor]) -> Tensor:
        return functional_call(module, {**constants, **parameters}, args)

    def tangent(direction: dict[str, Tensor]) -> Tensor:
        return jvp(forward, (primals,), (direction,))[1]

    return forward(primals), torch.func.vmap(tangent)(stacked)


def linearized_forward(
    module: nn.Module,
    theta0: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    frozen: Collection[str] = (),
) -> Tensor:
    """f_lin(x; θ0 + δ) = f(x; θ0) + J f(x; θ0) · δ (``frozen`` as in :func:`jvp_outputs`)."""
    output, tangent = jvp_outputs(module, theta0, delta, inputs, frozen)
    return output + tangent


def delta_between(theta: Mapping[str, Tensor], theta0: Mapping[str, Tensor]) -> StateDict:
    """θ − θ0 for every name of θ0 (the task vector, or a merged model's direction)."""
    return {name: theta[name] - theta0[name] for name in theta0}


class LinearizedModel(nn.Module):
    """f_lin(x; θ0 + δ) as a trainable module: only δ (zero at start) has parameters.

    θ0 is frozen (non-persistent buffers) and the wrapped network always runs in eval mode, so
    the expansion point never moves. ``frozen`` names parameters that keep δ = 0 (they get no
    δ parameter at all). ``task_vector()`` returns δ under the original names, with zeros for
    buffers and frozen parameters, i.e. exactly θ − θ0 of the linearized model.
    """

    def __init__(
        self, module: nn.Module, theta0: Mapping[str, Tensor], frozen: Collection[str] = ()
    ) -> None:
        super().__init__()
        unknown = sorted(set(frozen) - set(tangent_names(module)))
        if unknown:
            raise ModelError(
                f"cannot freeze {unknown[0]!r}: not a floating-point parameter of the model "
                "(name parameters as named_parameters() does)"
            )
        self.module = module.requires_grad_(False).eval()
        self.frozen = frozenset(frozen)
        self.names = tangent_names(module, self.frozen)
        self.state_names = list(theta0)
        for index, name in enumerate(self.state_names):
            self.register_buffer(f"theta0_{index}", theta0[name].detach().clone(), False)
        self.delta = nn.ParameterList(
            nn.Parameter(torch.zeros_like(theta0[name], dtype=theta0[name].dtype))
            for name in self.names
        )
        self.feature_dim = getattr(module, "feature_dim", None)

    def base_state(self) -> StateDict:
        return {name: getattr(self, f"theta0_{i}") for i, name in enumerate(self.state_names)}

    def forward(self, *inputs: Tensor) -> Tensor:
        delta = dict(zip(self.names, self.delta, strict=True))
        return linearized_forward(self.module, self.base_state(), delta, tuple(inputs), self.frozen)

    def train(self, mode: bool = True) -> LinearizedModel:
        super().train(mode)
        self.module.eval()  # dropout etc. would move the expansion point
        return self

    def task_vector(self) -> StateDict:
        """δ = θ − θ0 under the original parameter names (zeros for buffers and frozen names)."""
        trained = {name: p.detach().clone() for name, p in zip(self.names, self.delta, strict=True)}
        return {
            name: trained[name] if name in trained else torch.zeros_like(value)
            for name, value in self.base_state().items()
        }


BASE_PREFIX, DELTA_PREFIX = "base.", "delta."


def pack_linearized(theta0: Mapping[str, Tensor], theta: Mapping[str, Tensor]) -> StateDict:
    """The tensors of a served linearized model: ``base.<name>`` = θ0, ``delta.<name>`` = θ − θ0."""
    packed = {f"{BASE_PREFIX}{name}": value for name, value in theta0.items()}
    packed |= {f"{DELTA_PREFIX}{n}": v for n, v in delta_between(theta, theta0).items()}
    return packed


def unpack_linearized(tensors: Mapping[str, Tensor]) -> tuple[StateDict, StateDict]:
    """Inverse of `pack_linearized`: (θ0, δ) under the original names."""
    theta0 = {
        k.removeprefix(BASE_PREFIX): v for k, v in tensors.items() if k.startswith(BASE_PREFIX)
    }
    delta = {
        k.removeprefix(DELTA_PREFIX): v for k, v in tensors.items() if k.startswith(DELTA_PREFIX)
    }
    if set(theta0) != set(delta) or len(theta0) + len(delta) != len(tensors):
        raise ArtifactError(
            f"a linearized model holds exactly '{BASE_PREFIX}<name>' and '{DELTA_PREFIX}<name>' "
            "tensors for the same names"
        )
    return theta0, delta

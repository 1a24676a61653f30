"""LoRA factors as a task vector: ΔW = scale·B·A per adapted weight, computed when read.

An adapter task vector is stored as its factors under the *dense* weight's name ``W`` of the
base model: ``W.lora_A`` (r × in), ``W.lora_B`` (out × r) and ``W.lora_scale`` (a 0-d tensor,
alpha / r). :class:`LoraDelta` shows it as a dense task vector over every tensor of θ0 (zeros
where no adapter sits) and computes each ΔW only when asked for it, so every merge method takes
it unchanged and nothing holds all the dense deltas at once.

Linear merges are exact in factor space (:func:`concat_factors`):
Σ_t α_t s_t B_t A_t = [α_1 s_1 B_1 … α_T s_T B_T] · [A_1; …; A_T], a LoRA of rank Σ_t r_t.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from storage.errors import ArtifactError, MergeInputError

A, B, SCALE = ".lora_A", ".lora_B", ".lora_scale"


@dataclass(frozen=True)
class Factor:
    """One adapted weight: ΔW = scale · b @ a (``a``: r × in, ``b``: out × r)."""

    a: Tensor
    b: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> Tensor:
        return self.delta_rows(0, int(self.b.shape[0]))

    def delta_rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of :meth:`delta`, from those rows of ``b`` only."""
        return (self.b[start:stop].float() @ self.a.float()) * self.scale


def factors_to_tensors(factors: Mapping[str, Factor]) -> dict[str, Tensor]:
    """The stored layout: ``<W>.lora_A``, ``<W>.lora_B`` and ``<W>.lora_scale`` per weight."""
    tensors: dict[str, Tensor] = {}
    for name in sorted(factors):
        factor = factors[name]
        tensors[name + A] = factor.a.detach().float().contiguous()
        tensors[name + B] = factor.b.detach().float().contiguous()
        tensors[name + SCALE] = torch.tensor(float(factor.scale))
    return tensors


def factors_from_tensors(tensors: Mapping[str, Tensor], where: str) -> dict[str, Factor]:
    """Inverse of :func:`factors_to_tensors`; ``where`` names the file in errors."""
    names = {key.removesuffix(SCALE) for key in tensors if key.endswith(SCALE)}
    expected = {name + suffix for name in names for suffix in (A, B, SCALE)}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[0]
        raise ArtifactError(
            f"{where}: an adapter holds '<weight>{A}', '<weight>{B}' and '<weight>{SCALE}' for "
            f"the same weights; '{odd}' breaks that: rebuild the task vector"
        )
    factors = {}
    for name in sorted(names):
        a, b = tensors[name + A], tensors[name + B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ArtifactError(
                f"{where}: '{name}' has factors of shapes {tuple(b.shape)} and {tuple(a.shape)} "
                "that do not multiply: rebuild the task vector"
            )
        factors[name] = Factor(a, b, float(tensors[name + SCALE]))
    return factors


class LoraDelta(Mapping[str, Tensor]):
    """An adapter task vector seen as a dense one over θ0's tensors (see the module docstring).

    ``base`` gives the names, shapes and dtypes (θ0 itself, or anything mapping names to
    tensors); its values are never read. A lookup returns a new tensor: scale·B·A in the base
    tensor's dtype, or zeros. :meth:`read` is the merge engine's ``TensorSource``.
    """

    def __init__(self, factors: Mapping[str, Factor], base: Mapping[str, Tensor]) -> None:
        self.factors = dict(factors)
        self.shapes = {name: (tuple(t.shape), t.dtype) for name, t in base.items()}
        for name, factor in self.factors.items():
            if name not in self.shapes:
                raise MergeInputError(
                    f"an adapter adapts '{name}', which the base does not have: build task "
                    "vectors from the same base model"
                )
            shape = (factor.b.shape[0], factor.a.shape[1])
            if shape != self.shapes[name][0]:
                raise MergeInputError(
                    f"an adapter gives '{name}' a change of shape {shape} but the base tensor "
                    f"has {self.shapes[name][0]}: build task vectors from the same base model"
                )

    def __getitem__(self, name: str) -> Tensor:
        shape, dtype = self.shapes[name]
        factor = self.factors.get(name)
        if factor is None:
            return torch.zeros(shape, dtype=dtype)
        return factor.delta().to(dtype)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def read(self, name: str, out: Tensor | None = None) -> Tensor:
        if out is not None and name not in self.factors:
            return out.zero_()
        tensor = self[name]
        return tensor if out is None else out.copy_(tensor)

    def read_rows(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Rows ``start:stop`` of ΔW, so that the engine merges a large weight (an LLM's
        embedding) in blocks of rows with adapter task vectors too, never whole."""
        shape, dtype = self.shapes[name]
        factor = self.factors.get(name)
        if factor is None:
            rows = (stop - start, *shape[1:])
            return torch.zeros(rows, dtype=dtype) if out is None else out.zero_()
        tensor = factor.delta_rows(start, stop).to(dtype)
        return tensor if out is None else out.copy_(tensor)

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor, without computing any."""
        return [(name, dtype, shape) for name, (shape, dtype) in self.shapes.items()]

    @property
    def adapter_bytes(self) -> int:
        return sum(4 * (f.a.numel() + f.b.numel() + 1) for f in self.factors.values())

    @property
    def dense_bytes(self) -> int:
        return sum(
            math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            for shape, dtype in self.shapes.values()
        )


def concat_factors(
    task_factors: Mapping[str, Mapping[str, Factor]], alphas: Mapping[str, float]
) -> dict[str, Factor]:
    """Σ_t α_t ΔW_t as one factor per weight, exactly: B = [α_t s_t B_t]_t, A = [A_t]_t, scale 1.

    A weight that only some tasks adapt gets the factors of those tasks (the others add zero).
    """
    names = sorted({name for factors in task_factors.values() for name in factors})
    merged = {}
    for name in names:
        tasks = [t for t in sorted(task_factors) if name in task_factors[t]]
        a = torch.cat([task_factors[t][name].a.float() for t in tasks], dim=0)
        b = torch.cat(
            [
                task_factors[t][name].b.float() * (float(alphas[t]) * task_factors[t][name].scale)
                for t in tasks
            ],
            dim=1,
        )
        merged[name] = Factor(a, b, 1.0)
    return merged

"""Merge methods: pure functions from (θ0, {τ_t}, coefficient, params) to a merged backbone.

One method per file, registered under its file name (see `registry`); importing this package
imports every method file, so `list_methods()` is complete. Definitions: MERGING.md.

    from workers.merge import merge
    theta = merge("ties", base, task_vectors, coefficient=0.3, density=0.2)
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from workers.merge.backbone import Coefficient, StateDict, TaskVectors
from workers.merge.dare import drop_and_rescale
from workers.merge.registry import LinearForm, MergeMethod, get_method, list_methods
from workers.merge.tall_masks import pack_mask, tall_mask, unpack_mask
from workers.merge.task_arithmetic import negate
from workers.merge.ties import global_majority_sign, global_trim_thresholds
from workers.merge.validation import validate_task_vectors

SUPPORT_MODULES = frozenset(
    {
        "backbone",
        "blocks",
        "compression",
        "engine",
        "kernels",
        "plan",
        "registry",
        "statistics",
        "validation",
    }
)
"""Modules of this package that are not merge methods; every other module registers one."""

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")
        if _module.name not in list_methods():
            raise ImportError(f"{__name__}.{_module.name} registers no merge method of its name")


def merge(
    method: str,
    base: StateDict,
    task_vectors: TaskVectors,
    coefficient: Coefficient = 1.0,
    **params: Any,
) -> StateDict:
    """θ0 merged with the task vectors by `method`; inputs untouched, a new dict returned.

    `coefficient` is a shared λ (float) or one α_t per task (dict) where the method allows it.
    Bad inputs or params raise MergeInputError saying what to fix.
    """
    return get_method(method).merge(base, task_vectors, coefficient, **params)


__all__ = [
    "LinearForm",
    "MergeMethod",
    "drop_and_rescale",
    "get_method",
    "global_majority_sign",
    "global_trim_thresholds",
    "list_methods",
    "merge",
    "negate",
    "pack_mask",
    "tall_mask",
    "unpack_mask",
    "validate_task_vectors",
]

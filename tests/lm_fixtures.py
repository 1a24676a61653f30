"""Tiny causal language models for tests: a random two-layer Llama, nothing downloaded.

The model has tied embeddings (as SmolLM2 and most small Llamas do) and eager attention; its
tokenizer is a word-level ``tokenizers`` tokenizer over a few words, wrapped in
``PreTrainedTokenizerFast``, with a chat template. Both are saved with ``save_pretrained`` so the
pipeline reads them like any local model directory.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = (
    "what is the capital of france paris italy rome spain madrid germany berlin "
    "one two three four five six seven eight nine ten plus minus equals answer ? . ,"
).split()
VOCAB = SPECIALS + WORDS
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def tiny_tokenizer():
    """A word-level fast tokenizer over :data:`VOCAB` (pad 0, bos 1, eos 2, unk 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, vocab_size: int = 64, tie: bool = True):
    """A random 2-layer, 16-wide ``LlamaForCausalLM`` with eager attention (eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def write_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """:func:`tiny_llama` and :func:`tiny_tokenizer` saved as a local model directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed).save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    return directory

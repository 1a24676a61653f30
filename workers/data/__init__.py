"""Dataset sources, splits and content digests."""

from workers.data import files, hub  # noqa: F401  (register the "files", "huggingface" sources)
from workers.data.prompts import completion_ids, encode_prompts, encode_splits, prompt_ids
from workers.data.sources import load_dataset, register_source
from workers.data.splits import Splits

__all__ = [
    "Splits",
    "completion_ids",
    "encode_prompts",
    "encode_splits",
    "load_dataset",
    "prompt_ids",
    "register_source",
]

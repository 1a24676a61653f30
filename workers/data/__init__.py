"""Dataset sources, splits and content digests."""

from workers.data import files, hub  # noqa: F401  (register the "files", "huggingface" sources)
from workers.data.sources import load_dataset, register_source
from workers.data.splits import Splits

__all__ = ["Splits", "load_dataset", "register_source"]

"""Pure computation over tensors, paths and bytes: merges, fine-tuning, models, data, search."""

"""The validated spec, split by section, and the pure plan made from it."""

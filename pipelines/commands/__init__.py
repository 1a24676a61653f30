"""The `mergeline` commands other than `run`, one module per command."""

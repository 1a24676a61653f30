"""Task kinds, registered by file name: what a task's batches, loss and metrics are.

A kind is one file here (plus its tests). Stages, scorers and publishing ask the kind of the
base model (``base_model.kind``) and never branch on model classes:

- ``classification``: a frozen linear-probe head on pooled features, cross entropy, accuracy;
- ``causal_lm``: prompt -> completion through the model's own LM head, the loss on completion
  tokens only, token accuracy / exact match / nll.
"""

from workers.kinds.registry import KINDS, TaskKind, get_kind, register_kind

__all__ = ["KINDS", "TaskKind", "get_kind", "register_kind"]

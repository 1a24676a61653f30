"""Model sources (builtin backbones) and per-task heads."""

from workers.models.builtin import MLPBackbone, build_backbone
from workers.models.heads import apply_head, fit_linear_probe

__all__ = ["MLPBackbone", "apply_head", "build_backbone", "fit_linear_probe"]

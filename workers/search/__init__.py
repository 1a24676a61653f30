"""Evaluation and the candidate search: metrics, exact fast paths, per-task strategies."""

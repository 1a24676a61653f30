"""A task whose fine-tuned model scores 0 on val is named: its normalized accuracy is undefined."""

from __future__ import annotations

import io

from rich.console import Console

from pipelines.run.choose import warn_unnormalizable
from pipelines.search.selection import objective_scores


def test_a_task_fine_tuned_to_zero_is_named_once_and_would_outweigh_the_others() -> None:
    out = io.StringIO()
    warn_unnormalizable({"a": 0.8, "b": 0.0, "c": 0.5}, Console(file=out, width=300))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "task 'b'" in lines[0] and "mean_accuracy" in lines[0]
    out = io.StringIO()
    warn_unnormalizable({"a": 0.8, "c": 0.5}, Console(file=out, width=300))
    assert out.getvalue() == ""
    # why it warns: one such task's 0.1 outweighs a perfect merge of the others
    scores = objective_scores({"a": 0.8, "b": 0.1}, {"a": 0.8, "b": 0.0})
    assert scores["mean_normalized_accuracy"] > 1e10

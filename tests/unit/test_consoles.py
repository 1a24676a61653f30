"""Every command prints through :func:`pipelines.report.consoles.output_console`, so no table or
line is cut to 80 columns where there is no terminal (cron, CI, ``kubectl logs``)."""

from __future__ import annotations

import ast

from rich.table import Table

from pipelines.report.consoles import output_console
from tests.conftest import REPO

#: Where a bare rich Console is right: the factory itself, and the CLI's one-line error stream.
ALLOWED = {"pipelines/report/consoles.py", "pipelines/cli.py"}


def test_no_command_builds_a_bare_console() -> None:
    found = []
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        relative = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Console"
                and relative not in ALLOWED
            ):
                found.append(f"{relative}:{node.lineno}")
    assert found == [], (
        f"use pipelines.report.consoles.output_console() instead of Console(): {found}"
    )


def test_a_table_is_whole_without_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    uri = "s3://nightly-merges/store/models/fortunes-minilm/20261126-020000-3c4744"
    table = Table("run", "method", "model")
    table.add_row("20261126-020000-3c4744", "task_arithmetic+per_task_coefficients", uri)
    output_console().print(table)
    printed = capsys.readouterr().out
    assert "…" not in printed and "20261126-020000-3c4744" in printed
    assert "task_arithmetic+per_task_coefficients" in printed and uri in printed

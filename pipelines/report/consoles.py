"""Consoles for what the commands print: whole lines and whole tables where no one resizes.

In a terminal, rich fits tables to its width. Elsewhere (cron, CI, ``kubectl logs``, a pipe)
rich would assume 80 columns and cut cells to ``202611…``; there the width is left unbounded
unless ``COLUMNS`` sets one, so run ids, methods and URIs are printed whole.
"""

from __future__ import annotations

import os

from rich.console import Console

#: Wide enough for any table we print; a table takes only the width its cells need.
UNBOUNDED_WIDTH = 100_000


def output_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(stderr=stderr, width=UNBOUNDED_WIDTH)

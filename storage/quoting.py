"""User input quoted inside one-line error messages, cut so that no input makes a long line."""

from __future__ import annotations

#: Longest quoted value an error message shows, in characters (the quotes included).
QUOTE_LIMIT = 80


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to about ``limit`` characters with '…' when it is longer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return repr(value[: max(limit - 3, 1)] + "…")
    return text[: limit - 1] + "…"

"""User input quoted inside one-line error messages, cut so that no input makes a long line."""

from __future__ import annotations

#: Longest quoted value an error message shows, in characters (the quotes included).
QUOTE_LIMIT = 80
#: Longest error line the CLI prints; longer ones lose their middle (the advice is at the end).
LINE_LIMIT = 1000


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit - 1`` characters and '…' when it is longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to about ``limit`` characters with '…' when it is longer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return repr(value[: max(limit - 3, 1)] + "…")
    return cut(text, limit)


def shorten_line(text: str, limit: int = LINE_LIMIT) -> str:
    """A message of at most ``limit`` characters: its start and its end, '…' between them."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]} … {text[-half:]}"

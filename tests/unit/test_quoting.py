"""User input inside error lines is cut to a readable length (issue 19, minor)."""

from __future__ import annotations

from storage.quoting import LINE_LIMIT, QUOTE_LIMIT, quoted, shorten_line


def test_short_values_are_quoted_whole() -> None:
    assert quoted("digits") == "'digits'"
    assert quoted(3) == "3"


def test_long_values_are_cut_with_an_ellipsis() -> None:
    text = quoted("x" * 5_000_000)
    assert len(text) <= QUOTE_LIMIT
    assert text.startswith("'xxx") and text.endswith("…'")
    assert quoted(list(range(10_000))).endswith("…")


def test_a_long_line_keeps_its_start_and_its_advice() -> None:
    line = "field 'x': " + "y" * 100_000 + " is wrong: use z"
    short = shorten_line(line)
    assert len(short) <= LINE_LIMIT
    assert short.startswith("field 'x': ") and short.endswith("use z") and " … " in short
    assert shorten_line("fine") == "fine"

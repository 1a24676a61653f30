"""Text in a declared encoding, checked where it is read: a byte that is not valid text
fails naming the file, the line or row, and the encoding, instead of a decoder traceback."""

from __future__ import annotations

import codecs

from storage.errors import DataError

DEFAULT_ENCODING = "utf-8"


def check_encoding(name: str) -> str:
    """``name`` if Python knows that text encoding; ``ValueError`` otherwise."""
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise ValueError(
            f"unknown text encoding {name!r}: use a Python codec name such as utf-8, "
            "latin-1 or cp1252"
        ) from None
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"{name!r} is not a text encoding: use e.g. utf-8, latin-1 or cp1252")
    return name


def to_utf8(data: bytes, encoding: str, where: str) -> bytes:
    """The bytes of a line-oriented text file (CSV, JSONL) in ``encoding``, as UTF-8."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{where}: line {line} is not valid {encoding} text "
            f"({_bytes(data[error.start : error.end])}): {_advice(encoding)}"
        ) from None
    if codecs.lookup(encoding).name == "utf-8":
        return data
    return text.encode("utf-8")


def decode_rows(values: list[bytes | None], encoding: str, where: str) -> list[str | None]:
    """Binary cells of a column (Parquet text written as bytes) as strings; row counts from 0."""
    texts: list[str | None] = []
    for row, value in enumerate(values):
        try:
            texts.append(None if value is None else value.decode(encoding))
        except UnicodeDecodeError as error:
            raise DataError(
                f"{where}: row {row} (counting from 0) is not valid {encoding} text "
                f"({_bytes(value[error.start : error.end])}): {_advice(encoding)}"
            ) from None
    return texts


def _bytes(bad: bytes) -> str:
    return "byte " + " ".join(f"0x{b:02x}" for b in bad[:4])


def _advice(encoding: str) -> str:
    return (
        f"save the file as {encoding} or set dataset.encoding to the file's encoding "
        "(e.g. latin-1, cp1252)"
    )

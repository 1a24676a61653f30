"""The one rule for every spec value that becomes a path component, a store key or an MLflow
name: the spec's name, task names, method names, the experiment and the registered model.

The rule fits all three at once: no '/', ':' or '..', so nothing escapes the store and MLflow
accepts the name (``team/digits`` is refused at load time, not after fine-tuning).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

from storage.quoting import quoted

NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: Marks a name field in the spec's JSON schema; a test checks that every name carries it.
NAME_SCHEMA_KEY = "x-mergeline-name"
NAME_ADVICE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME = re.compile(NAME_PATTERN)


def is_name(value: str) -> bool:
    return bool(_NAME.fullmatch(value))  # `$` alone would let a trailing newline through


def check_name(value: str) -> str:
    """``value`` if it passes the rule, else a ValueError saying how to fix it."""
    if not is_name(value):
        raise ValueError(
            f"{quoted(value)} is not safe as a path component and MLflow name: {NAME_ADVICE}"
        )
    return value


Name = Annotated[
    str,
    AfterValidator(check_name),
    WithJsonSchema(
        {"type": "string", "pattern": NAME_PATTERN, "maxLength": 64, NAME_SCHEMA_KEY: True}
    ),
]

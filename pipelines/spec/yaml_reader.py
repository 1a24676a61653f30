"""YAML as specs are read: YAML 1.2 core scalars, and no key given twice in one mapping.

PyYAML implements YAML 1.1, where ``off``, ``no`` and ``on`` are booleans, ``010`` is octal,
``1:30`` is 90 and ``2026-01-01`` is a date. A spec means the text it shows: here only
``true``/``false`` are booleans, so ``merge.fast_path: off`` (the README's spelling) is the
string ``off``; a boolean field still accepts ``yes``/``no``/``on``/``off`` (pydantic reads
them). Files and ``--set`` values go through the same loader.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode

from storage.quoting import quoted

_MERGE_TAG = "tag:yaml.org,2002:merge"
#: PyYAML's resolvers kept as they are; bool, int and float are replaced, timestamps dropped.
_KEPT_RESOLVERS = (_MERGE_TAG, "tag:yaml.org,2002:null")
_INT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


class DuplicateKeyError(ConstructorError):
    """A mapping gives the same key twice; YAML would silently keep the last value."""

    def __init__(self, key: Any, first: int, node: Node) -> None:
        self.what = f"key {quoted(key)} is given twice in one mapping"
        line = node.start_mark.line + 1
        super().__init__(None, None, f"{self.what} (lines {first} and {line})", node.start_mark)


class SpecLoader(yaml.SafeLoader):
    """Safe loading with YAML 1.2 core scalars; a repeated key is an error, not 'last wins'."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag in _KEPT_RESOLVERS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # keys merged in from '<<' may be overridden
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: construct_mapping says so
                continue
            if first is not None:
                raise DuplicateKeyError(key, first, key_node)
            lines[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: ScalarNode) -> int:
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if digits.startswith(("0o", "0x")):
            return sign * int(digits, 0)
        return sign * int(digits, 10)  # '010' is ten, as in YAML 1.2


SpecLoader.add_constructor("tag:yaml.org,2002:int", SpecLoader.construct_yaml_int)
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``text`` as a spec reads it (see the module's docstring)."""
    return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader

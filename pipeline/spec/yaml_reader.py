"""Reading a job spec's YAML safely: what PyYAML's ``safe_load`` lets through that a spec must not.

- A duplicate key is an error (``safe_load`` keeps the last one, silently dropping a setting).
- ``1e-3`` is a float (YAML 1.1 reads it as a string; YAML 1.2 and every user read it as a number).
- A file is at most :data:`MAX_BYTES`, and aliases may not expand it past :data:`MAX_VALUES` values: a 1 KB
  "billion laughs" file would otherwise become gigabytes once the spec is copied or dumped.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_VALUES = 100_000


class SpecYAMLError(ValueError):
    """One line: what is wrong and where (line, column)."""


class _SpecLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecYAMLError(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line {seen[key] + 1})"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats: an exponent without a dot (1e-3, 5E+2) included.
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load(text: str) -> Any:
    """The YAML document in ``text``; :class:`SpecYAMLError` (one line) for anything a spec must not be."""
    if len(text.encode()) > MAX_BYTES:
        raise SpecYAMLError(f"the file is larger than {MAX_BYTES // 1024} KiB; a job spec is a few KiB")
    try:
        data = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        raise SpecYAMLError(
            f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
        ) from None
    if _expanded_size(data, MAX_VALUES) > MAX_VALUES:
        raise SpecYAMLError(f"the aliases expand it to more than {MAX_VALUES:,} values")
    return data


def _expanded_size(value: Any, limit: int) -> int:
    """How many values ``value`` holds once every shared (aliased) part is counted each time it appears; the
    count stops past ``limit``, so an exponential document costs no more than that."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count

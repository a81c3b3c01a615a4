"""A registry of named entries (methods, LoRA variants): what a config field may name."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from .errors import SDTConfigError


class Named(Protocol):
    name: str


Entry = TypeVar("Entry", bound=Named)


class Registry(dict[str, Entry], Generic[Entry]):
    """``name -> entry``, filled by :meth:`register`; :meth:`lookup` fails naming the config ``field``."""

    def __init__(self, field: str) -> None:
        super().__init__()
        self.field = field

    def register(self, entry: Entry) -> Entry:
        if entry.name in self:
            raise ValueError(f"{self.field} {entry.name!r} is registered twice")
        self[entry.name] = entry
        return entry

    def lookup(self, name: str) -> Entry:
        if name not in self:
            raise SDTConfigError(self.field, f"{name!r} is not one of {', '.join(self)}")
        return self[name]

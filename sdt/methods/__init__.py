"""The method registry: every fine-tuning method sdt knows, one small file each.

A :class:`Method` says what a method trains (LoRA adapters, SDT's sparse deltas, or every weight), which fields of
:class:`sdt.SDTConfig` it sets by default (its preset) and how it describes itself. Everything else in sdt and in
the pipeline asks the registry instead of comparing method names, so a new method is one file here plus one line
in this module's imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..registry import Registry

Need = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    ``lora`` / ``sdt``: whether the method's config must name LoRA targets (SDT targets), may, or must not.
    ``defaults``: the :class:`sdt.SDTConfig` fields the method's preset sets (others keep the dataclass default).
    """

    name: str
    summary: str  # one line, for help texts and model cards
    lora: Need
    sdt: Need
    trains_all_weights: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)


METHODS: Registry[Method] = Registry("method")
register_method = METHODS.register
get_method = METHODS.lookup


# The registered methods, in the order help texts list them.
from . import sdlora, sdt, lora, full  # noqa: E402,F401,I001  (registration happens on import, in the order help texts list them)

__all__ = ["METHODS", "Method", "get_method", "register_method"]

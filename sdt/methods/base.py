"""What a method is (:class:`Method`) and the registry the method files add themselves to."""

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
    ``baseline``: the method this one claims to beat, by name: a sweep that trains both says whether it does.
    ``state``: the state tensor it trains in every mixer (:mod:`sdt.state`: ``offset`` or ``initial``), or None.
    """

    name: str
    summary: str  # one line, for help texts and model cards
    lora: Need
    sdt: Need
    trains_all_weights: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""  # how people write the name in a sentence ("SDLoRA"); empty: the name itself
    baseline: str | None = None
    state: str | None = None

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name)


METHODS: Registry[Method] = Registry("method")
register_method = METHODS.register
get_method = METHODS.lookup

__all__ = ["METHODS", "Method", "Need", "get_method", "register_method"]

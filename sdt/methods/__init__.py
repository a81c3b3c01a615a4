"""The method registry: every fine-tuning method sdt knows, one small file each.

A :class:`Method` (:mod:`sdt.methods.base`) says what a method trains (LoRA adapters, SDT's sparse deltas, or every
weight), which fields of :class:`sdt.SDTConfig` it sets by default (its preset) and how it describes itself.
Everything else in sdt and in the pipeline asks the registry instead of comparing method names, so a new method is
one file here plus one line in this module's imports.
"""

from __future__ import annotations

from .base import METHODS, Method, get_method, register_method

# isort: split
# Registration happens on import: in the order help texts list the methods.
from . import sdlora, sdt, lora, full, state_offset, initial_state  # noqa: F401,I001

__all__ = ["METHODS", "Method", "get_method", "register_method"]

"""The error a config raises: the lowest module of sdt, so that the registries and the config can both raise it."""

from __future__ import annotations


class SDTConfigError(ValueError):
    """A config that cannot work. ``field`` names the :class:`sdt.SDTConfig` field at fault (``"method"`` for the
    method itself), ``reason`` says why; ``str()`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


__all__ = ["SDTConfigError"]

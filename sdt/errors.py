"""The errors a config and a model raise: the lowest module of sdt, so that the registries, the config and the
families can all raise them."""

from __future__ import annotations


class SDTConfigError(ValueError):
    """A config that cannot work. ``field`` names the :class:`sdt.SDTConfig` field at fault (``"method"`` for the
    method itself), ``reason`` says why; ``str()`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


class UnsupportedModelError(ValueError):
    """A model sdt cannot tune. ``field`` names what is at fault: ``"model_type"``, or the key of the model's
    config (``"n_groups"``); ``reason`` says why; ``str()`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


__all__ = ["SDTConfigError", "UnsupportedModelError"]

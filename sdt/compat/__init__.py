"""Upstream internals: every private or unstable API of transformers, mamba-ssm / causal-conv1d and DeepSpeed that
sdt touches, one module per upstream, each use with a test that names the upstream and its version when it changes
(tests/test_compat.py). The pipeline's own are in :mod:`pipeline.compat`, which raises this module's
:class:`CompatError` too.

- :mod:`.transformers`: Trainer's loading of checkpoints, the marks of quantized and offloaded models, the names a
  Mamba mixer's forward takes its cache under;
- :mod:`.mamba_ssm`: the CUDA kernels' extension entry points, called as mamba-ssm calls them;
- :mod:`.deepspeed`: ZeRO-3's mark on a partitioned parameter (read without importing DeepSpeed).

Imports: the upstream libraries only; nothing else of sdt.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any


class CompatError(RuntimeError):
    """An upstream internal that sdtune relies on is gone or has changed. ``str()`` names the upstream, its installed
    version and the internal: ``ray 2.60.0: ray._private.state.state has no _connect_and_get_accessor``."""

    def __init__(self, upstream: str, internal: str, change: str) -> None:
        self.upstream, self.internal = upstream, internal
        super().__init__(f"{upstream} {installed_version(upstream)}: {internal} {change}")


def installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def require(owner: Any, name: str, upstream: str, where: str) -> Any:
    """``owner.<name>``; a :class:`CompatError` naming ``<where>`` where it is gone (also before an assignment to
    it, which would otherwise add an attribute nothing reads)."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise CompatError(upstream, where, f"has no {name}") from None

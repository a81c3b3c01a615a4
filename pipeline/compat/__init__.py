"""Upstream internals: every private or unstable API of Ray, Ray Tune, Optuna, DeepSpeed and transformers that
the pipeline touches, one module per upstream (``ray``, ``tune`` with Optuna, ``deepspeed``, ``transformers``), each
use with a test that names the upstream and its version when it changes (tests/test_compat.py, which also keeps
such uses out of every other module). transformers' and mamba-ssm's internals that sdt touches are in
:mod:`sdt.compat`, whose :class:`~sdt.compat.CompatError` these modules raise too.

Imports: the upstream libraries and :mod:`sdt.compat`; nothing of ``pipeline``.
"""

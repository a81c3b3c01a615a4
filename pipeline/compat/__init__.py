"""Upstream internals: every private or unstable API of Ray, Ray Tune, Optuna, DeepSpeed and transformers that
the pipeline touches, one module per upstream, each use with a test that names the upstream and its version when
it changes (tests/test_compat.py).

Imports: the upstream libraries only; nothing of ``pipeline``.
"""

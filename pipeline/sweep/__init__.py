"""The sweep: Ray Tune over trials (``tune``), its callbacks (``callbacks``: MLflow mirroring, cost records, the
trial ledger, progress) and what a person sees while it runs (``console``).

Imports: every room below it: ``compat``, ``storage``, ``tasks``, ``spec``, ``trial``, ``results``.
"""

"""One trial: what each Ray Train worker runs (``worker``: load, warmup, select, train, evaluate, checkpoint), the
Tune function that builds its worker group (``driver``), the base model it loads (``models``), the shared SDT warmup
(``warmup``, agreed through ``claims``) and the progress its rank 0 writes (``progress``).

Imports: ``pipeline.compat``, ``pipeline.storage``, ``pipeline.tasks``, ``pipeline.spec``.
"""

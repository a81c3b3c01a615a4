"""Where a sweep's files live and how they are written: local directories or object storage (``paths``), and the
names of what a sweep directory holds (``layout``).

Imports: ``pipeline.compat``.
"""

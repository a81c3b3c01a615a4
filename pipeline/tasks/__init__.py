"""The data of a sweep: the task registry (``registry``), one module per task (where its splits come from, its kind
and metrics), prompt formatting and collation (``formatting``), evaluation (``metrics``) and batched decoding
(``decoding``). The built-in digits task ships its tiny pretrained base (``digits``, ``digits_base/``).

Imports: ``pipeline.compat``, ``pipeline.storage``.
"""

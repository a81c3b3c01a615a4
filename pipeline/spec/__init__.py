"""The job spec: the typed sections of one YAML file, validated once (``job``), and its strict YAML reader
(``yaml_reader``). Method fields come from ``sdt``'s registry, task names from ``pipeline.tasks``.

Imports: ``pipeline.compat``, ``pipeline.storage``, ``pipeline.tasks``.
"""

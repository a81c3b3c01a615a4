"""The tasks sdtune ships, one module each, registered when ``pipeline.tasks`` imports them: ``digits``,
``synthetic``, ``glue``, ``generation`` and ``files``. Each imports only the registry and the shared split logic at
module level, since the job spec imports them all."""

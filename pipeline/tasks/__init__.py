"""The data of a sweep: the task registry (``registry``: what a task is, ``TASKS``, ``register_task``), the tasks
sdtune ships (``builtin/``, one module each, registered here on import), the split logic they share (``splits``),
a task's data as tokenized examples (``sources``), prompt formatting and collation (``formatting``), how an epoch's
training examples become micro-batches (``batching``: padded, grouped by length, packed), evaluation
(``metrics``) and batched decoding (``decoding``). The built-in digits task ships its tiny pretrained base
(``digits``, ``digits_base/``).

Imports: ``pipeline.compat``, ``pipeline.storage``.
"""

# The shipped tasks, registered on import in the order help texts and errors list them.
from pipeline.tasks.builtin import digits, synthetic, glue, generation, files  # noqa: F401,I001

"""What a sweep produced and what is made of it: the trials' outcomes (``outcomes``), their arm labels (``arms``),
MLflow tracking (``tracking``), the best trial's export (``export``) and the sweep report (``report``).

Imports: every room below it: ``compat``, ``storage``, ``tasks``, ``spec``, ``trial``.
"""

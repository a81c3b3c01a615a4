"""The ``sdtune`` command (``commands``) and the checks of a job against this machine before anything starts
(``preflight``).

Imports: any room.
"""

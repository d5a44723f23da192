"""The ``mbt`` command (``main``), the flags shared by every process (``flags``) and the runner of
long-lived services (``service``). Subcommands live in ``commands``, one module each.

Nothing is re-exported: ``mbt_node`` and ``mbt_aggregator`` import ``flags`` and ``service``
without loading every subcommand.
"""

"""Processes on this machine: starting and watching node and gateway processes, the local cluster
that ``mbt cluster``, the benchmarks and the tests run, and timing helpers for benchmarks.

Processes are started by command line (``python -m mbt_node``, ``python -m mbt_aggregator``),
never imported: the core knows neither package. Import the modules directly; this package
re-exports nothing so that importing it starts nothing heavy.
"""

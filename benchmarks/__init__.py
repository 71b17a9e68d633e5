"""Side-by-side figures for deferred_signals against the usual hand-written idioms.

Run with ``make bench`` (or ``python -m benchmarks.run`` from the repository root). The
benchmark owns its Django settings and app (``benchmarks.settings``, ``benchmarks.benchapp``)
and talks to the real PostgreSQL and Redis on 127.0.0.1; nothing here is a test.
"""

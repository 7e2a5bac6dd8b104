"""The benchmark suite: ``python -m bench``.

Starts its own durable PostgreSQL (fsync and synchronous_commit on), runs the real
daemon (``batch-supervisor run`` subprocesses talking HTTP) through each scenario a
few times, runs the peers (PgQueuer, Procrastinate) and a raw asyncpg claim/complete
loop on the same server, and prints medians with min-max and the ratios that the
issue's targets are stated in. See bench/README.md.
"""

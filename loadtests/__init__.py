"""Load tests and benchmarks for Sluice.

    sluice loadtest             the users' check: locust traffic at a fixed rate, thresholds, exactly-once check
    sluice bench                how far the pipeline goes on this machine (lean asyncio load generator)

Both use the stack that answers on 127.0.0.1:8000, or start one (Redis, Cassandra, schema, API, workers) and
stop everything they started when they finish, fail or are interrupted. Output goes under ``build/``.
"""

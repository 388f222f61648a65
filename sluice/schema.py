"""Apply the Cassandra schema once: ``sluice schema apply``.

Run by ``make up`` (and by the one-shot schema step in compose and on ECS) before any service starts;
services never create tables themselves, because concurrent schema changes are not safe in Cassandra. It
applies the migrations the keyspace lacks (sluice/migrate.py), then the tables' retention options
(SLUICE_RETENTION_DAYS); run twice, or twice at once, it changes nothing more.
"""

from __future__ import annotations

import logging
import time

from cassandra.cluster import NoHostAvailable

from sluice.cassandra import apply_schema, connect
from sluice.logs import setup_logging
from sluice.settings import get_settings

log = logging.getLogger("sluice.schema")


def run(wait_s: float = 60.0) -> int:
    """Connect (waiting up to ``wait_s`` for Cassandra to answer), apply the schema; the exit code."""
    setup_logging()
    settings = get_settings()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cluster, session = connect(settings)
            break
        except NoHostAvailable as exc:
            if time.monotonic() >= deadline:
                log.error(
                    "Cassandra at %s:%s did not answer: %s",
                    settings.cassandra_contact_points,
                    settings.cassandra_port,
                    exc,
                )
                return 1
            log.info("waiting for Cassandra at %s:%s", settings.cassandra_contact_points, settings.cassandra_port)
            time.sleep(2)
    try:
        apply_schema(session, settings)
    finally:
        cluster.shutdown()
    log.info(
        "schema applied to keyspace %s (replication %s, retention %s days)",
        settings.cassandra_keyspace,
        settings.cassandra_replication,
        settings.retention_days or "unlimited",
    )
    return 0


if __name__ == "__main__":
    # The old `python -m sluice.schema`: the same as `sluice schema apply` (never a silent no-op).
    import sys

    from sluice.cli import main

    sys.exit(main(["schema", "apply", *sys.argv[1:]]))

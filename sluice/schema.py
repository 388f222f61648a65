"""Apply the Cassandra schema once: ``python -m sluice.schema``.

Run by ``make up`` (and by the one-shot schema step in compose and on ECS) before any service starts;
services never create tables themselves, because concurrent schema changes are not safe in Cassandra. It
applies the migrations the keyspace lacks (sluice/migrate.py), then the tables' retention options
(SLUICE_RETENTION_DAYS); run twice, or twice at once, it changes nothing more.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from cassandra.cluster import NoHostAvailable

from sluice.cassandra import apply_schema, connect
from sluice.logs import setup_logging
from sluice.settings import get_settings

log = logging.getLogger("sluice.schema")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluice.schema", description=__doc__)
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for Cassandra to answer")
    args = parser.parse_args(argv)
    setup_logging()
    settings = get_settings()
    deadline = time.monotonic() + args.wait
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
    sys.exit(main())

"""``sluice worker``: run a Celery worker on the events queue.

Extra arguments go to ``celery worker`` (e.g. ``sluice worker --concurrency 4 -- --max-tasks-per-child 100``).
SIGTERM is a warm shutdown: the batch in flight is finished and acknowledged before the process exits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from sluice import keys
from sluice.logs import setup_logging


def run(
    *,
    concurrency: int | None = None,
    queues: str | None = None,
    pool: str | None = None,
    loglevel: str | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Run ``celery worker`` in this process; None takes the settings' value (or Celery's, for the pool)."""
    # prometheus_client needs its multiprocess directory to exist before anything imports it.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    setup_logging()
    from worker.app import app, settings

    argv = [
        "worker",
        "--queues", queues or keys.EVENTS_QUEUE,
        "--loglevel", loglevel or settings.log_level,
        "--concurrency", str(concurrency or settings.worker_concurrency),
        "--without-gossip",
        "--without-mingle",
        # The ECS health check (infra/services.yaml) pings the worker by this node name.
        "--hostname", f"sluice-worker-{os.getpid()}@%h",
    ]  # fmt: skip
    if pool:
        argv += ["--pool", pool]
    app.worker_main([*argv, *extra])

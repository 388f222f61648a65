"""``sluice worker``: run a Celery worker on the events queue.

Extra arguments go to ``celery worker`` (e.g. ``sluice worker --concurrency 4 -- --max-tasks-per-child 100``).
SIGTERM is a warm shutdown: the batch in flight is finished and acknowledged before the process exits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from celery.signals import worker_init

from sluice import keys
from sluice.logs import setup_logging


def run(
    *,
    concurrency: int | None = None,
    queues: str | None = None,
    pool: str | None = None,
    loglevel: str | None = None,
    extra: Sequence[str] = (),
) -> int:
    """Run ``celery worker`` in this process; None takes the settings' value (or Celery's, for the pool).

    Returns the worker's exit code: 0 after a warm shutdown, 1 after Celery's "Unrecoverable error" (so a
    supervisor sees the crash; ``app.worker_main`` drops the code and would make it 0)."""
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
    # Celery's command ends with ctx.exit(worker.exitcode), but worker_main (and app.start) drop that code:
    # read it off the worker itself, which the worker_init signal hands over.
    workers: list[Any] = []

    def keep(sender: Any, **_: Any) -> None:
        workers.append(sender)

    worker_init.connect(keep, weak=False)
    try:
        app.worker_main([*argv, *extra])
    finally:
        worker_init.disconnect(keep)
    code = workers[-1].exitcode if workers else None
    return code if isinstance(code, int) else 0

"""``python -m worker``: run a Celery worker on the events queue.

Extra arguments go to ``celery worker`` (e.g. ``python -m worker --concurrency 4``). SIGTERM is a warm
shutdown: the batch in flight is finished and acknowledged before the process exits.
"""

from __future__ import annotations

import os
import sys

from sluice import keys
from sluice.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
    # prometheus_client needs its multiprocess directory to exist before anything imports it.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    setup_logging()
    from worker.app import app, settings

    args = argv if argv is not None else sys.argv[1:]
    defaults = [
        "worker",
        "--queues", keys.EVENTS_QUEUE,
        "--loglevel", settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--hostname", f"sluice-worker-{os.getpid()}@%h",
    ]  # fmt: skip
    if not any(a.startswith(("--concurrency", "-c")) for a in args):
        defaults += ["--concurrency", str(settings.worker_concurrency)]
    app.worker_main(defaults + args)


if __name__ == "__main__":
    main()

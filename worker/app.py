"""The Celery worker app and its per-process clients.

Each worker process opens its own Cassandra session after the fork (``worker_process_init``): a driver
session holds sockets and I/O threads that must never be shared across processes. It is closed when the
process shuts down.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import bootsteps
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown
from prometheus_client import start_http_server

from sluice.metrics import mark_process_dead, registry
from sluice.queue import make_celery
from sluice.settings import get_settings
from worker.clients import clients
from worker.recovery import recover_lost
from worker.transport import transport_for

log = logging.getLogger("sluice.worker")

settings = get_settings()
app = make_celery(settings)
# Messages Celery cannot decode or route go to the dead-letter store instead of being dropped, and so do
# messages kombu cannot even parse (the transport's guard): no bytes on the queue can stop a worker.
app.conf.worker_consumer = "worker.consumer:DeadLetteringConsumer"
app.conf.broker_transport = transport_for(settings.redis_url)
# The tasks module imports this one (for ``app``); the worker imports it at start, so no cycle.
app.conf.include = ["worker.tasks"]


@worker_process_init.connect
def _open_clients(**_: Any) -> None:
    try:
        clients.writer  # noqa: B018 - connect now, not on the first task
    except Exception as exc:  # noqa: BLE001 - Cassandra may be down; tasks retry and connect later
        log.warning("Cassandra not reachable at start (tasks will retry): %s", exc)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _close_clients(**_: Any) -> None:
    clients.close()
    mark_process_dead(os.getpid())


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    if settings.worker_metrics_port is not None:
        start_http_server(settings.worker_metrics_port, registry=registry())
        log.info("serving Prometheus metrics on :%d/metrics", settings.worker_metrics_port)


class RestoreUnacked(bootsteps.StartStopStep):
    """Hand out again, promptly, the messages a dead worker left unacknowledged.

    kombu's Redis transport does this itself only on every tenth of its 10-second checks, so a message a
    killed worker held could wait the visibility timeout plus 100 s. This step checks every quarter of the
    visibility timeout (at most every 30 s); only messages older than the timeout are restored. Then it
    re-queues accepted events whose message was lost before it was ever recorded (worker/recovery.py), also
    while the queue has a backlog.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.interval = min(30.0, settings.visibility_timeout_s / 4)
        self.stopping = threading.Event()

    def start(self, parent: Any) -> None:
        # A thread of its own, not the worker's timer: while Redis is away, kombu's connection set-up blocks
        # (it retries), and on the timer that would stall the consumer itself until Redis came back.
        def loop() -> None:
            while not self.stopping.wait(self.interval):
                self.restore(parent)

        threading.Thread(target=loop, name="sluice-restore", daemon=True).start()

    def restore(self, parent: Any) -> None:
        try:
            with parent.app.connection_for_read() as conn:
                conn.default_channel.qos.restore_visible(num=1000, interval=1)
            # Events whose message never reached the unacknowledged set (see worker/recovery.py).
            recover_lost(clients.marks, older_than_s=settings.visibility_timeout_s + 2 * self.interval)
        except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
            log.warning("could not restore unacknowledged messages: %r", exc)

    def stop(self, parent: Any) -> None:
        self.stopping.set()


app.steps["worker"].add(RestoreUnacked)
app.steps["consumer"].add("worker.liveness:Heartbeat")  # liveness file for healthchecks

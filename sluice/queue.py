"""The worker's Celery app, and how task messages are delivered.

Configured for at-least-once delivery on Redis and nothing else: tasks carry plain JSON, there is no
result backend, and the delivery options (:data:`DELIVERY`) are set here once.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

from celery import Celery

from sluice import keys
from sluice.message import WRITE_EVENTS
from sluice.settings import Settings

__all__ = ["DELIVERY", "WRITE_EVENTS", "make_celery"]

#: How every task message is delivered: the one place these are set (the app's defaults and each task).
#: Acknowledged only after the task ran (``acks_late``); handed back when the process running it died
#: (``reject_on_worker_lost``); and a task that *raised* is not acknowledged either: on Redis, Celery's
#: "reject without requeue" drops the message, so our tasks never let an exception escape (they retry,
#: dead-letter, or ``Reject(requeue=True)``), and this stays False so that a bug cannot ack silently.
DELIVERY: Final[dict[str, Any]] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "acks_on_failure_or_timeout": False,
}


def make_celery(settings: Settings) -> Celery:
    """The shared Celery app (the worker's; the API publishes without Celery, see sluice/message.py)."""
    app = Celery("sluice", broker=settings.redis_url, set_as_current=False)
    socket_timeout = settings.redis_socket_timeout_s
    transport: dict[str, Any] = {
        # Longer than a task can run (task_time_limit), so a slow task is never handed to a second worker.
        "visibility_timeout": settings.visibility_timeout_s,
        # Without socket timeouts kombu would block forever on a stalled Redis.
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "socket_keepalive": True,
        "retry_on_timeout": False,
        "health_check_interval": 10,
        "unacked_key": keys.UNACKED,
        "unacked_index_key": keys.UNACKED_INDEX,
        "unacked_mutex_key": keys.UNACKED_MUTEX,
    }
    if settings.redis_url.startswith("sentinel://"):
        # kombu's Sentinel transport: it asks the sentinels for the primary on every (re)connection, so after a
        # failover the workers consume from the new primary, where the queue and the unacknowledged set are.
        transport["master_name"] = settings.redis_sentinel_master
        transport["sentinel_kwargs"] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    if settings.redis_url.startswith("rediss://"):
        # TLS to the broker (e.g. ElastiCache in-transit encryption) verifies the server's certificate.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue=keys.EVENTS_QUEUE,
        task_routes={WRITE_EVENTS: {"queue": keys.EVENTS_QUEUE}},
        task_acks_late=DELIVERY["acks_late"],
        task_reject_on_worker_lost=DELIVERY["reject_on_worker_lost"],
        task_acks_on_failure_or_timeout=DELIVERY["acks_on_failure_or_timeout"],
        # Each pool process's share of unacknowledged messages: the worker buffers what it receives and writes
        # whatever waits while its processes are busy in one run (worker/batching.py), so it must be able to
        # hold a run's worth. Late acks: every one of them stays in Redis's unacknowledged set until written.
        worker_prefetch_multiplier=settings.worker_batch_messages,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 10),
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # A primary without its replica refuses writes (NOREPLICAS, min-replicas-to-write) and one just demoted
        # answers READONLY: Redis error replies, which Celery would treat as unrecoverable and exit on. Retried
        # like a lost connection instead, the worker waits (draining nothing, losing nothing) until the queue
        # takes writes again, and kombu's Sentinel transport then finds the primary.
        broker_channel_error_retry=True,
        broker_connection_timeout=socket_timeout,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        # Our handlers write to stderr; Celery's stdout redirection would swallow the pool processes' logs.
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_enable_remote_control=True,
    )
    return app

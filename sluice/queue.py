"""The Celery app both sides share: the API publishes to it, the worker consumes from it.

Configured for at-least-once delivery on Redis and nothing else: tasks carry plain JSON, there is no
result backend, a message is acknowledged only after its events are written (``acks_late``), and a message
whose worker process died is requeued rather than acknowledged (``task_reject_on_worker_lost``).
"""

from __future__ import annotations

from typing import Final

from celery import Celery

from sluice import keys
from sluice.settings import Settings

#: The one task: write a batch of validated events to Cassandra.
WRITE_EVENTS: Final = "sluice.write_events"


def make_celery(settings: Settings, *, publisher: bool = False) -> Celery:
    """The shared Celery app. ``publisher=True`` configures the API's side: a short socket timeout and no
    publish retry, so a Redis that is away turns into a fast 503 rather than a request held for seconds."""
    app = Celery("sluice", broker=settings.redis_url, set_as_current=False)
    socket_timeout = settings.publish_timeout_s if publisher else settings.redis_socket_timeout_s
    transport = {
        # Longer than a task can run (task_time_limit), so a slow task is never handed to a second worker.
        "visibility_timeout": settings.visibility_timeout_s,
        # Without socket timeouts kombu would block forever on a stalled Redis, and so would the API.
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "socket_keepalive": True,
        "retry_on_timeout": False,
        "health_check_interval": 10,
        "unacked_key": keys.UNACKED,
        "unacked_index_key": keys.UNACKED_INDEX,
        "unacked_mutex_key": keys.UNACKED_MUTEX,
    }
    if publisher:
        # kombu otherwise retries a refused connection after a 2 s pause before giving up: a request held
        # for 2 s per publish while Redis is down. Fail at once; the client retries on 503.
        transport |= {"max_retries": 0, "interval_start": 0}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue=keys.EVENTS_QUEUE,
        task_routes={WRITE_EVENTS: {"queue": keys.EVENTS_QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # One message per process at a time: with late acks, prefetching more would strand messages.
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 10),
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=socket_timeout,
        # The API does not retry a publish: the client retries on 503, with the same event ids.
        task_publish_retry=not publisher,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        # Our handlers write to stderr; Celery's stdout redirection would swallow the pool processes' logs.
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_enable_remote_control=True,
    )
    return app

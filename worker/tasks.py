"""The worker's tasks, each declared through :func:`instrumented_task`.

A task here never fails in the Celery sense: a failed task's message is acknowledged and gone. Every run
ends in one of three ways: the events are written; the task is retried with backoff (a new message is in
Redis before the old one is acknowledged); or, after the last attempt, the events go to the dead-letter
store with the reason. If even the retry cannot be published, the message is rejected back to the queue.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Reject, Retry

from sluice.events import BookingEvent, ViewEvent, validate_event
from sluice.queue import WRITE_EVENTS
from worker import deadletters
from worker.app import app, clients, settings

log = logging.getLogger("sluice.worker")

F = TypeVar("F", bound=Callable[..., Any])


def instrumented_task(name: str, **options: Any) -> Callable[[F], F]:
    """Declare a task with the project's delivery guarantees: late acks, requeue on a lost worker,
    bounded retries; JSON arguments only (the app accepts nothing else)."""
    defaults: dict[str, Any] = {
        "name": name,
        "bind": True,
        "acks_late": True,
        "reject_on_worker_lost": True,
        # A failure we did not handle (a bug) must not acknowledge the message: reject it instead.
        "acks_on_failure_or_timeout": False,
        "max_retries": settings.task_max_retries,
        "ignore_result": True,
    }
    return app.task(**(defaults | options))  # type: ignore[no-any-return]


def backoff_s(retries: int) -> float:
    """Exponential backoff with jitter, so workers do not hammer a recovering Cassandra in step."""
    ceiling = min(settings.task_retry_backoff_max_s, settings.task_retry_backoff_s * 2**retries)
    return float(ceiling * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not cryptography


@instrumented_task(WRITE_EVENTS)
def write_events(
    self: Task[Any, Any], events: list[Any], accepted_at: float, request_ids: list[str] | None = None
) -> int:
    """Write a batch of events; returns how many were written."""
    started = time.perf_counter()
    valid: list[ViewEvent | BookingEvent] = []
    rejected: list[tuple[Any, str]] = []
    for raw in events if isinstance(events, list) else [events]:
        outcome = validate_event(raw)
        if isinstance(outcome, list):
            reason = "; ".join(f"{'.'.join(map(str, e.loc)) or '<event>'}: {e.msg}" for e in outcome)
            rejected.append((raw, f"invalid event: {reason}"))
        else:
            valid.append(outcome)
    if rejected:
        # A message from an older or broken producer must not block the valid events it carries.
        deadletters.add(clients.redis, rejected, task_id=self.request.id, attempts=self.request.retries + 1)
        log.warning("dead-lettered %d invalid events of task %s", len(rejected), self.request.id)

    accepted = dt.datetime.fromtimestamp(accepted_at, dt.UTC)
    try:
        clients.writer.write(valid, accepted)
    except Exception as exc:  # noqa: BLE001 - every store error is retried, then dead-lettered
        attempt = self.request.retries + 1
        if self.request.retries >= (self.max_retries or 0):
            deadletters.add(
                clients.redis,
                [(event.model_dump(mode="json"), f"write failed after {attempt} attempts: {exc!r}") for event in valid],
                task_id=self.request.id,
                attempts=attempt,
            )
            log.error("dead-lettered %d events of task %s after %d attempts: %r", len(valid), self.request.id,
                      attempt, exc)  # fmt: skip
            return 0
        countdown = backoff_s(self.request.retries)
        log.warning("writing %d events failed (attempt %d), retrying in %.1f s: %r", len(valid), attempt,
                    countdown, exc)  # fmt: skip
        # Only the valid events travel on: the invalid ones are already dead-lettered.
        try:
            raise self.retry(
                args=([event.model_dump(mode="json") for event in valid], accepted_at),
                kwargs={"request_ids": request_ids},
                countdown=countdown,
                exc=exc,
            )
        except Retry:
            raise
        except Exception as publish_exc:
            log.error("could not queue the retry (%r); returning the message to the queue", publish_exc)
            raise Reject(publish_exc, requeue=True) from publish_exc
    log.info("wrote %d events in %.1f ms (task %s, requests %s)", len(valid),
             (time.perf_counter() - started) * 1000, self.request.id, ",".join(request_ids or [])[:200])  # fmt: skip
    return len(valid)

"""The worker's tasks, each declared through :func:`instrumented_task`.

A task here never fails in the Celery sense: a failed task's message is acknowledged and gone. Every run
ends in one of three ways for each event: it is written; it is retried with backoff (a new message is in
Redis before the old one is acknowledged); or, after the last attempt, it goes to the dead-letter store
with the reason. If even the retry cannot be published, the message is rejected back to the queue.
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

from sluice import keys
from sluice.events import BookingEvent, ViewEvent, validate_event
from sluice.metrics import EVENT_LAG, EVENTS_WRITTEN, TASK_RETRIES, WRITE_DURATION
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


def _count_drained(written: int, done: list[ViewEvent | BookingEvent]) -> None:
    """Feed the drain rate the API's backpressure uses, and clear the "queued" marks of the events that are
    done (written or dead-lettered). Best effort: a lost count only skews Retry-After, and a mark left
    behind expires (and is never read for a stored event: the store is asked first)."""
    try:
        with clients.redis.pipeline(transaction=False) as pipe:
            pipe.incrby(keys.WRITTEN_TOTAL, written)
            pipe.incr(keys.DRAINED_MESSAGES)
            if done:
                ids = [str(event.event_id) for event in done]
                pipe.hdel(keys.QUEUED, *ids)
                pipe.zrem(keys.QUEUED_INDEX, *ids)
            pipe.execute()
    except Exception as exc:  # noqa: BLE001
        log.debug("could not count drained events: %r", exc)


def _still_queued(events: list[ViewEvent | BookingEvent]) -> None:
    """Events travelling on in a retry are not lost: keep recovery (worker/recovery.py) off them."""
    try:
        clients.redis.zadd(keys.QUEUED_INDEX, dict.fromkeys((str(e.event_id) for e in events), time.time()), xx=True)
    except Exception as exc:  # noqa: BLE001 - at worst recovery queues them again, which is idempotent
        log.debug("could not refresh the queued index: %r", exc)


def _count_written(
    valid: list[ViewEvent | BookingEvent], failed: list[tuple[ViewEvent | BookingEvent, Exception]], accepted_at: float
) -> list[ViewEvent | BookingEvent]:
    """Count the written events in the metrics; returns them."""
    failed_ids = {id(event) for event, _ in failed}
    written = [event for event in valid if id(event) not in failed_ids]
    views = sum(1 for event in written if event.type == "view")
    if views:
        EVENTS_WRITTEN.labels("view").inc(views)
    if len(written) > views:
        EVENTS_WRITTEN.labels("booking").inc(len(written) - views)
    if written:
        # One observation per message: its events share the moment the API accepted them.
        EVENT_LAG.observe(max(0.0, time.time() - accepted_at))
    return written


def _parse_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], float, list[str]] | str:
    """The task's arguments, or why they cannot be used (a message from an older or broken producer)."""
    events = args[0] if args else kwargs.get("events")
    accepted_at = args[1] if len(args) > 1 else kwargs.get("accepted_at")
    request_ids = kwargs.get("request_ids") or []
    if not isinstance(events, list):
        return f"malformed task arguments: events is {type(events).__name__}, not a list"
    if not isinstance(accepted_at, int | float) or isinstance(accepted_at, bool):
        accepted_at = time.time()
    if not isinstance(request_ids, list):
        request_ids = []
    return events, float(accepted_at), [str(r) for r in request_ids]


@instrumented_task(WRITE_EVENTS)
def write_events(self: Task[Any, Any], *args: Any, **kwargs: Any) -> int:
    """Write a batch of events: ``write_events(events, accepted_at, request_ids=[...])``; returns how many
    were written. Takes ``*args``: a message with the wrong arguments must be dead-lettered, not lost to a
    TypeError before this body runs."""
    started = time.perf_counter()
    attempt = self.request.retries + 1
    parsed = _parse_arguments(args, kwargs)
    if isinstance(parsed, str):
        deadletters.add(clients.redis, [({"args": args, "kwargs": kwargs}, parsed)], task_id=self.request.id,
                        attempts=attempt, kind="malformed_task")  # fmt: skip
        log.error("dead-lettered task %s: %s", self.request.id, parsed)
        _count_drained(0, [])
        return 0
    events, accepted_at, request_ids = parsed

    valid: list[ViewEvent | BookingEvent] = []
    rejected: list[tuple[Any, str]] = []
    for raw in events:
        outcome = validate_event(raw)
        if isinstance(outcome, list):
            reason = "; ".join(f"{'.'.join(map(str, e.loc)) or '<event>'}: {e.msg}" for e in outcome)
            rejected.append((raw, f"invalid event: {reason}"))
        else:
            valid.append(outcome)
    if rejected:
        # A message from an older or broken producer must not block the valid events it carries.
        deadletters.add(clients.redis, rejected, task_id=self.request.id, attempts=attempt, kind="invalid_event")
        log.warning("dead-lettered %d invalid events of task %s", len(rejected), self.request.id)

    accepted = dt.datetime.fromtimestamp(accepted_at, dt.UTC)
    try:
        failed = clients.writer.write(valid, accepted)
    except Exception as exc:  # noqa: BLE001 - e.g. no connection at all: every event failed
        failed = [(event, exc) for event in valid]
    took = time.perf_counter() - started
    WRITE_DURATION.observe(took)
    done = _count_written(valid, failed, accepted_at)
    written = len(done)
    if not failed:
        log.info("wrote %d events in %.1f ms (task %s, attempt %d)", written, took * 1000, self.request.id,
                 attempt, extra={"task_id": self.request.id, "request_ids": request_ids})  # fmt: skip
        _count_drained(written, done)
        return written

    error = failed[0][1]
    if self.request.retries >= (self.max_retries or 0):
        deadletters.add(
            clients.redis,
            [
                (event.model_dump(mode="json"), f"write failed after {attempt} attempts: {exc!r}")
                for event, exc in failed
            ],
            task_id=self.request.id,
            attempts=attempt,
        )
        log.error("dead-lettered %d events of task %s after %d attempts: %r", len(failed), self.request.id,
                  attempt, error)  # fmt: skip
        _count_drained(written, done + [event for event, _ in failed])
        return written
    countdown = backoff_s(self.request.retries)
    TASK_RETRIES.inc()
    _still_queued([event for event, _ in failed])
    log.warning("writing %d of %d events failed (attempt %d), retrying in %.1f s: %r", len(failed), len(valid),
                attempt, countdown, error)  # fmt: skip
    try:
        # Only the failed events travel on: the rest are written, the invalid ones dead-lettered.
        raise self.retry(
            args=([event.model_dump(mode="json") for event, _ in failed], accepted_at),
            kwargs={"request_ids": request_ids},
            countdown=countdown,
            exc=error,
        )
    except Retry:
        raise
    except Exception as publish_exc:
        log.error("could not queue the retry (%r); returning the message to the queue", publish_exc)
        raise Reject(publish_exc, requeue=True) from publish_exc

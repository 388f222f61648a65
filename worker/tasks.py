"""The worker's tasks, each declared through :func:`instrumented_task`.

A task here never fails in the Celery sense: on Redis, a task that raises has its message dropped (Celery
rejects it without requeue). Every run ends in one of these ways for each event: it is stored (now, or it
already was); it is a conflict with a stored first version (dead-lettered as such); it is retried with
backoff (a new message, published with its marks' scores refreshed, before this one is acknowledged); or,
after the last attempt, it goes to the dead-letter store with the reason. If Redis refuses any of those
records, the task raises ``Reject(requeue=True)``: the message goes back to the queue (or stays
unacknowledged, to be handed out again), never acknowledged with its events nowhere.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from celery import Task
from celery.exceptions import Reject

from sluice import deadletters, keys, message
from sluice.deadletters import Item
from sluice.events import queued_form, validate_event
from sluice.marks import Marks
from sluice.message import WRITE_EVENTS
from sluice.metrics import EVENT_LAG, TASK_RETRIES, WRITE_DURATION, WRITTEN_BY_TYPE
from sluice.queue import DELIVERY
from worker.app import app, settings
from worker.clients import clients
from worker.writer import Row, WriteOutcome, parse_queued

log = logging.getLogger("sluice.worker")

F = TypeVar("F", bound=Callable[..., Any])


def instrumented_task(name: str, **options: Any) -> Callable[[F], F]:
    """Declare a task with the project's delivery guarantees (sluice.queue.DELIVERY), bounded retries and
    no result; JSON arguments only (the app accepts nothing else)."""
    defaults: dict[str, Any] = {
        "name": name,
        "bind": True,
        **DELIVERY,
        "max_retries": settings.task_max_retries,
        "ignore_result": True,
    }
    return app.task(**(defaults | options))  # type: ignore[no-any-return]


def backoff_s(retries: int) -> float:
    """Exponential backoff with jitter, so workers do not hammer a recovering Cassandra in step."""
    ceiling = min(settings.task_retry_backoff_max_s, settings.task_retry_backoff_s * 2**retries)
    return float(ceiling * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not cryptography


class _MustRequeue(Exception):
    """Redis refused a record this message's outcome depends on: hand the message back, do not ack it."""


def _dead_letter(items: Sequence[Item], **kwargs: Any) -> None:
    # Only Redis can refuse a dead letter: the record holds any content (sluice/deadletters.py), so an event
    # can never make this fail, and requeueing happens only while Redis refuses writes.
    try:
        deadletters.add(clients.redis, items, **kwargs)
    except redis.RedisError as exc:
        raise _MustRequeue(f"could not dead-letter {len(items)} item(s): {exc!r}") from exc


def _finish(stored: Sequence[Row], accepted_at: float) -> None:
    """Count the stored events, clear their marks and feed the drain rate behind the API's Retry-After.

    Best effort: a mark left behind is re-queued later by recovery and found stored (one read); a lost count
    only skews Retry-After."""
    for kind, count in Counter(row.type for row in stored).items():
        WRITTEN_BY_TYPE[kind].inc(count)  # a row's type is a declared one: parse_queued makes no other
    if stored:
        # One observation per message: its events share the moment the API accepted them.
        EVENT_LAG.observe(max(0.0, time.time() - accepted_at))
    try:
        with clients.redis.pipeline(transaction=False) as pipe:
            pipe.incrby(keys.WRITTEN_TOTAL, len(stored))
            pipe.incr(keys.DRAINED_MESSAGES)
            Marks.done(pipe, [row.id for row in stored])
            pipe.execute()
    except Exception as exc:  # noqa: BLE001
        log.warning("could not clear the marks of %d stored events: %r", len(stored), exc)


@instrumented_task(WRITE_EVENTS)
def write_events(self: Task[Any, Any], *args: Any, **kwargs: Any) -> int:
    """Write a batch of events: ``write_events(events, accepted_at=..., request_ids=[...])``; returns how many
    are stored. Takes ``*args``: a message with the wrong arguments must be dead-lettered, not lost to a
    TypeError before this body runs."""
    try:
        try:
            return _write_events(self, args, kwargs)
        except _MustRequeue:
            raise
        except Exception as exc:  # whatever the content, the message ends as a dead letter
            # Not one of the outcomes above: content this code did not foresee, a bug, or the soft time limit.
            # Raising would drop the message (Celery rejects a failed task without requeue) and requeueing it
            # would loop, so its events are dead-lettered, once: each on its own where the arguments say which
            # (so each leaves the recovery index and is not queued again to fail the same way), else the
            # message as it came. What of it was already stored stays stored (a replay finds it stored).
            log.exception("task %s failed on its content; dead-lettering its events", self.request.id)
            parsed = message.parse_arguments(args, kwargs)
            reason = f"task failed: {exc!r}"[:1000]
            items = ([Item(event, reason) for event in parsed.events] if not isinstance(parsed, str) else []) or [
                Item({"args": args, "kwargs": kwargs}, reason)]  # fmt: skip
            _dead_letter(items, kind="task_failed", task_id=self.request.id, attempts=self.request.retries + 1)
            _finish([], time.time())
            return 0
    except _MustRequeue as exc:
        log.error("%s; returning the message to the queue", exc)
        # Redis is refusing writes (full, or failing over): a pause, or this message would loop hot.
        time.sleep(1.0)
        raise Reject(str(exc), requeue=True) from exc


def _write_events(self: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    started = time.perf_counter()
    attempt = self.request.retries + 1
    task_id = self.request.id
    parsed = message.parse_arguments(args, kwargs)
    if isinstance(parsed, str):
        _dead_letter([Item({"args": args, "kwargs": kwargs}, parsed)], kind="malformed_task", task_id=task_id,
                     attempts=attempt)  # fmt: skip
        log.error("dead-lettered task %s: %s", task_id, parsed)
        _finish([], time.time())
        return 0

    valid: list[Row] = []
    rejected: list[Item] = []
    for raw in parsed.events:
        # The API's own messages are trusted (shape and types checked while converting); anything else, or
        # an event that does not convert, is validated in full, and refused with the reason if invalid.
        row = parse_queued(raw) if parsed.trusted else None
        if row is None:
            checked = validate_event(raw)
            if isinstance(checked, list):
                reason = "; ".join(f"{'.'.join(map(str, e.loc)) or '<event>'}: {e.msg}" for e in checked)
                rejected.append(Item(raw, f"invalid event: {reason}"))
                continue
            row = parse_queued(queued_form(checked))
            assert row is not None, "the queued form of a valid event always converts"
        valid.append(row)
    if rejected:
        # A message from an older or broken producer must not block the valid events it carries.
        _dead_letter(rejected, kind="invalid_event", task_id=task_id, attempts=attempt,
                     accepted_at=parsed.accepted_at)  # fmt: skip
        log.warning("dead-lettered %d invalid events of task %s", len(rejected), task_id)

    accepted = dt.datetime.fromtimestamp(parsed.accepted_at, dt.UTC)
    try:
        outcome = clients.writer.write(valid, accepted)
    except Exception as exc:  # noqa: BLE001 - e.g. no connection at all: every event failed
        outcome = WriteOutcome(failed=[(row, exc) for row in valid])
    took = time.perf_counter() - started
    WRITE_DURATION.observe(took)

    if outcome.conflicts:
        ids = [row.id for row in outcome.conflicts]
        _dead_letter(
            [Item(row.queued, "conflict: this event_id is stored with other content; the first version "
                  "wins") for row in outcome.conflicts],
            kind="conflict", task_id=task_id, attempts=attempt, accepted_at=parsed.accepted_at, release_marks=ids,
        )  # fmt: skip
        log.warning("refused %d events of task %s: their ids are stored with other content", len(ids), task_id)

    if outcome.failed:
        error = outcome.failed[0][1]
        failed = [row.queued for row, _ in outcome.failed]
        if self.request.retries >= (self.max_retries or 0):
            _dead_letter(
                [Item(event, f"write failed after {attempt} attempts: {exc!r}")
                 for event, (_, exc) in zip(failed, outcome.failed, strict=True)],
                kind="write_failed", task_id=task_id, attempts=attempt, accepted_at=parsed.accepted_at,
            )  # fmt: skip
            log.error("dead-lettered %d events of task %s after %d attempts: %r", len(failed), task_id, attempt,
                      error)  # fmt: skip
        else:
            countdown = backoff_s(self.request.retries)
            # Only the failed events travel on: the rest are stored, refused or dead-lettered.
            retry = message.build(failed, accepted_at=parsed.accepted_at, request_ids=parsed.request_ids,
                                  retries=self.request.retries + 1, countdown_s=countdown, origin="retry")  # fmt: skip
            try:
                clients.marks.requeue(retry, [event["event_id"] for event in failed])
            except Exception as exc:
                raise _MustRequeue(f"could not queue the retry of {len(failed)} events: {exc!r}") from exc
            TASK_RETRIES.inc()
            log.warning("writing %d of %d events failed (attempt %d), retrying in %.1f s: %r", len(failed),
                        len(valid), attempt, countdown, error)  # fmt: skip

    _finish(outcome.stored, parsed.accepted_at)
    if not outcome.failed:
        log.info("wrote %d events in %.1f ms (task %s, attempt %d)", len(outcome.stored), took * 1000, task_id,
                 attempt, extra={"task_id": task_id, "request_ids": parsed.request_ids})  # fmt: skip
    return len(outcome.stored)

"""The worker's tasks, each declared through :func:`instrumented_task`.

A task here never fails in the Celery sense: on Redis, a task that raises has its message dropped (Celery
rejects it without requeue). Every run ends in one of these ways for each event: it is stored (now, or it
already was); it is a conflict with a stored first version (dead-lettered as such); it is retried with
backoff (a new message, published with its marks' scores refreshed, before this one is acknowledged); or,
after the last attempt, it goes to the dead-letter store with the reason. If Redis refuses any of those
records, the message goes back to the queue (or stays unacknowledged, to be handed out again), never
acknowledged with its events nowhere.

The worker runs several messages at once (:func:`run_batch`, handed over by worker/batching.py): their events
are read and written together, and each message still ends as it would alone.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from sluice import deadletters, keys, message
from sluice.deadletters import Item
from sluice.events import queued_form, validate_event
from sluice.marks import Marks
from sluice.message import WRITE_EVENTS, JsonEvent
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


def _finish(stored: Sequence[Row], runs: Sequence[_Run], drained: int) -> None:
    """Count the stored events, clear their marks and feed the drain rate behind the API's Retry-After
    (``drained``: the messages this run is done with).

    Best effort: a mark left behind is re-queued later by recovery and found stored (one read); a lost count
    only skews Retry-After."""
    for kind, count in Counter(row.type for row in stored).items():
        WRITTEN_BY_TYPE[kind].inc(count)  # a row's type is a declared one: parse_queued makes no other
    now = time.time()
    for run in runs:
        if run.rows:
            # One observation per message: its events share the moment the API accepted them.
            EVENT_LAG.observe(max(0.0, now - run.accepted_at))
    try:
        with clients.redis.pipeline(transaction=False) as pipe:
            pipe.incrby(keys.WRITTEN_TOTAL, len(stored))
            pipe.incrby(keys.DRAINED_MESSAGES, drained)
            Marks.done(pipe, [row.id for row in stored])
            pipe.execute()
    except Exception as exc:  # noqa: BLE001
        log.warning("could not clear the marks of %d stored events: %r", len(stored), exc)


@dataclass(eq=False)
class _Run:
    """One message of a run: its arguments, its rows, and whether it is done with (``keep``: acknowledge)."""

    task_id: str
    retries: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    parsed: message.TaskArguments | str
    rows: list[Row] = field(default_factory=list)
    #: False: Redis refused a record this message's outcome depends on; it goes back to the queue.
    keep: bool = True
    #: Settled (dead-lettered whole, or handed back): nothing of it is written in this run.
    settled: bool = False
    #: Every event of it is parsed into ``rows`` (or dead-lettered as invalid).
    parsed_all: bool = False
    #: Its outcome is decided: stored, retried, refused or dead-lettered.
    decided: bool = False

    @property
    def attempt(self) -> int:
        return self.retries + 1

    @property
    def accepted_at(self) -> float:
        return self.parsed.accepted_at if not isinstance(self.parsed, str) else time.time()


def _decode(body: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A task body (``[args, kwargs, ...]``, as the consumer decoded it, or its JSON) as ``(args, kwargs)``;
    anything else as arguments the message parser refuses, so the message is dead-lettered with its content."""
    try:
        # The standard library's JSON, as kombu's: orjson would read an integer over 64 bits as a float.
        decoded = json.loads(body) if isinstance(body, str | bytes | bytearray) else body
        args, kwargs = decoded[0], decoded[1]
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        return (), {"body": repr(body)[:1000], "error": repr(exc)}
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return (), {"args": args, "kwargs": kwargs}
    return tuple(args), kwargs


def run_batch(jobs: Sequence[tuple[str, Any, int]]) -> list[bool]:
    """Write the events of several messages in one run (worker/batching.py hands them over): one first-write-
    wins read and one write for all their events, one Redis pipeline for their marks. Each message ends as it
    would alone (stored, retried, dead-lettered); returns per message True (acknowledge it) or False (Redis
    refused a record its outcome depends on: back to the queue). Never raises."""
    runs = []
    for task_id, body, retries in jobs:
        args, kwargs = _decode(body)
        runs.append(_Run(task_id, retries, args, kwargs, message.parse_arguments(args, kwargs)))
    try:
        _write_runs(runs)
    except SoftTimeLimitExceeded as exc:
        _timed_out(runs, exc)
    except Exception as exc:  # whatever the content, the messages end as dead letters
        # Not one of the outcomes above: content this code did not foresee, or a bug.
        # Raising would lose the messages' fate (the pool reports it as a failure) and requeueing them would
        # loop, so the events of each message not yet done with are dead-lettered, once: each on its own where
        # the arguments say which (so each leaves the recovery index and is not queued again to fail the same
        # way), else the message as it came. What of them was already stored stays stored.
        log.exception("a run of %d messages failed on its content; dead-lettering their events", len(runs))
        reason = f"task failed: {exc!r}"[:1000]
        for run in runs:
            if run.settled:
                continue
            items = ([Item(event, reason) for event in run.parsed.events] if not isinstance(run.parsed, str)
                     else []) or [Item({"args": run.args, "kwargs": run.kwargs}, reason)]  # fmt: skip
            _settle(run, items, kind="task_failed", task_id=run.task_id, attempts=run.attempt)
        _finish([], [], sum(run.keep for run in runs))
    if not all(run.keep for run in runs):
        # Redis is refusing writes (full, or failing over): a pause, or these messages would loop hot.
        time.sleep(1.0)
    return [run.keep for run in runs]


def _timed_out(runs: Sequence[_Run], exc: SoftTimeLimitExceeded) -> None:
    """A run that passed its soft time limit outside the write (which turns it into failed writes itself):
    time, not content. A Cassandra node going down slows every write until the driver gives up on it, and the
    limit then lands anywhere (seen in the ring test, in the step after the write: dead-lettering those
    events there left acknowledged events unstored). So each message not yet decided is retried like a failed
    write, counted against its attempts: only one that keeps timing out is dead-lettered, after its last."""
    log.warning("a run of %d messages passed its soft time limit; retrying those not yet decided", len(runs))
    for run in runs:
        if run.settled or run.decided:
            continue
        if isinstance(run.parsed, str):  # unreadable arguments: content, whatever the time
            _dead_letter_unreadable(run, run.parsed)
            continue
        events = [row.queued for row in run.rows] if run.parsed_all else list(run.parsed.events)
        if events:
            _retry_or_give_up(run, [(event, exc) for event in events], len(run.parsed.events))
    _finish([], [], sum(run.keep for run in runs))


def _settle(run: _Run, items: Sequence[Item], **kwargs: Any) -> bool:
    """Dead-letter ``items`` for ``run``; if Redis refuses, the message goes back to the queue whole."""
    try:
        _dead_letter(items, **kwargs)
    except _MustRequeue as exc:
        log.error("%s; returning the message to the queue (task %s)", exc, run.task_id)
        run.keep, run.settled = False, True
        return False
    return True


def _dead_letter_unreadable(run: _Run, why: str) -> None:
    """A message whose arguments are not a message at all: dead-lettered whole, as it came."""
    _settle(run, [Item({"args": run.args, "kwargs": run.kwargs}, why)], kind="malformed_task",
            task_id=run.task_id, attempts=run.attempt)  # fmt: skip
    log.error("dead-lettered task %s: %s", run.task_id, why)
    run.settled = True


def _write_runs(runs: Sequence[_Run]) -> None:
    started = time.perf_counter()
    for run in runs:
        parsed = run.parsed
        if isinstance(parsed, str):
            _dead_letter_unreadable(run, parsed)
            continue
        rejected: list[Item] = []
        accepted = dt.datetime.fromtimestamp(parsed.accepted_at, dt.UTC)
        for raw in parsed.events:
            # The API's own messages are trusted (shape and types checked while converting); anything else, or
            # an event that does not convert, is validated in full, and refused with the reason if invalid.
            row = parse_queued(raw, accepted) if parsed.trusted else None
            if row is None:
                checked = validate_event(raw)
                if isinstance(checked, list):
                    reason = "; ".join(f"{'.'.join(map(str, e.loc)) or '<event>'}: {e.msg}" for e in checked)
                    rejected.append(Item(raw, f"invalid event: {reason}"))
                    continue
                row = parse_queued(queued_form(checked), accepted)
                assert row is not None, "the queued form of a valid event always converts"
            run.rows.append(row)
        run.parsed_all = True
        # A message from an older or broken producer must not block the valid events it carries.
        if rejected:
            if not _settle(run, rejected, kind="invalid_event", task_id=run.task_id, attempts=run.attempt,
                           accepted_at=parsed.accepted_at):  # fmt: skip
                continue
            log.warning("dead-lettered %d invalid events of task %s", len(rejected), run.task_id)

    live = [run for run in runs if not run.settled]
    rows = [row for run in live for row in run.rows]
    try:
        outcome = clients.writer.write(rows)
    except Exception as exc:  # noqa: BLE001 - e.g. no connection at all: every event failed
        outcome = WriteOutcome(failed=[(row, exc) for row in rows])
    took = time.perf_counter() - started
    WRITE_DURATION.observe(took)

    # Each message's share of the outcome: its conflicts and failures are its own (task id, attempts, retry).
    # Rows compare by value, runs by identity (eq=False): a row is found by its id(), a run is a key itself.
    owner = {id(row): run for run in live for row in run.rows}
    conflicts: dict[_Run, list[Row]] = defaultdict(list)
    failed: dict[_Run, list[tuple[Row, Exception]]] = defaultdict(list)
    for row in outcome.conflicts:
        conflicts[owner[id(row)]].append(row)
    for row, error in outcome.failed:
        failed[owner[id(row)]].append((row, error))
    for run in live:
        assert not isinstance(run.parsed, str)
        mine = conflicts.get(run, [])
        if mine and not _settle(
            run,
            [Item(row.queued, "conflict: this event_id is stored with other content; the first version wins")
             for row in mine],
            kind="conflict", task_id=run.task_id, attempts=run.attempt, accepted_at=run.parsed.accepted_at,
            release_marks=[row.id for row in mine],
        ):  # fmt: skip
            continue
        if mine:
            log.warning("refused %d events of task %s: their ids are stored with other content", len(mine),
                        run.task_id)  # fmt: skip
        if failed.get(run):
            _retry_or_give_up(run, [(row.queued, error) for row, error in failed[run]], len(run.rows))
        run.decided = True
    stored_ids = {id(row) for row in outcome.stored}
    done = [run for run in live if run.keep]
    _finish([row for run in done for row in run.rows if id(row) in stored_ids], done, sum(run.keep for run in runs))
    if rows and not outcome.failed:
        request_ids = [r for run in live if not isinstance(run.parsed, str) for r in run.parsed.request_ids]
        log.info("wrote %d events of %d messages in %.1f ms", len(outcome.stored), len(live), took * 1000,
                 extra={"task_ids": [run.task_id for run in live], "request_ids": request_ids})  # fmt: skip


def _retry_or_give_up(run: _Run, failures: list[tuple[JsonEvent, BaseException]], of: int) -> None:
    """Failed writes of one message: retried with backoff (a new message with only them), or after the last
    attempt dead-lettered."""
    assert not isinstance(run.parsed, str)
    error = failures[0][1]
    events = [event for event, _ in failures]
    if run.retries >= settings.task_max_retries:
        if _settle(run, [Item(event, f"write failed after {run.attempt} attempts: {exc!r}")
                         for event, (_, exc) in zip(events, failures, strict=True)],
                   kind="write_failed", task_id=run.task_id, attempts=run.attempt,
                   accepted_at=run.parsed.accepted_at):  # fmt: skip
            log.error("dead-lettered %d events of task %s after %d attempts: %r", len(events), run.task_id,
                      run.attempt, error)  # fmt: skip
        return
    countdown = backoff_s(run.retries)
    # Only the failed events travel on: the rest are stored, refused or dead-lettered.
    retry = message.build(events, accepted_at=run.parsed.accepted_at, request_ids=run.parsed.request_ids,
                          retries=run.retries + 1, countdown_s=countdown, origin="retry")  # fmt: skip
    try:
        clients.marks.requeue(retry, [event["event_id"] for event in events])
    except Exception as exc:  # noqa: BLE001 - Redis refused: the message goes back whole
        log.error("could not queue the retry of %d events: %r; returning the message to the queue (task %s)",
                  len(events), exc, run.task_id)  # fmt: skip
        run.keep, run.settled = False, True
        return
    TASK_RETRIES.inc()
    log.warning("writing %d of %d events failed (attempt %d), retrying in %.1f s: %r", len(events), of,
                run.attempt, countdown, error)  # fmt: skip


@instrumented_task(WRITE_EVENTS, Strategy="worker.batching:strategy")
def write_events(self: Task[Any, Any], *args: Any, **kwargs: Any) -> int:
    """Write a batch of events: ``write_events(events, accepted_at=..., request_ids=[...])``.

    The worker does not run this body: its consumer hands every message of this task to :func:`run_batch`,
    several at a time (worker/batching.py, this task's ``Strategy``). It serves a direct call (``apply``) with
    the same code. Takes ``*args``: a message with the wrong arguments must be dead-lettered, not lost to a
    TypeError before this body runs."""
    [keep] = run_batch([(str(self.request.id), [list(args), kwargs, None], self.request.retries or 0)])
    if not keep:
        raise Reject("Redis refused a record this message's outcome depends on", requeue=True)
    return 0

"""Publishing accepted events to the queue: concurrent requests share one message, written with its marks.

Each request hands its events to :class:`BatchingPublisher` and waits; one background loop gathers what
arrived (while it is busy, waiting at most ``linger`` for more; while requests arrive fast, ``rate_linger``;
while messages wait in the queue, up to ``backlog_linger``; and not at all once a message holds enough
events, ``ENOUGH_EVENTS``, or when requests come one at a time to an idle queue: a quiet API never waits),
writes the message and the events' queued marks to Redis in one script (:mod:`sluice.marks`), and only then
wakes the waiting requests. Everything runs on the event loop (redis.asyncio), with no thread hop. So a request
is answered 202 only once its events and their marks are in Redis, and a request's events always travel in one
message: all of them are queued, or none.

The script also decides "first write wins": an event whose id already has a mark is a duplicate (same
fingerprint: answered as accepted, nothing new queued) or a conflict (another version: 409), and the message
is then written without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sluice import message
from sluice.marks import CONFLICT, DUPLICATE, NEW, mark_value
from sluice.message import JsonEvent, Message
from sluice.metrics import PUBLISH_BATCH_EVENTS, PUBLISH_FAILURES, TALLY

log = logging.getLogger(__name__)

#: Writes one message with its marks; ``[]`` when written, else one status per mark and nothing written.
EnqueueFn = Callable[[Message, Sequence[tuple[str, bytes]]], Awaitable[list[str]]]


class PublishError(RuntimeError):
    """The events could not be written to the queue.

    ``definite`` says the events are certainly not queued (Redis refused the connection or the command).
    Otherwise the outcome is unknown: the command may have reached Redis before the connection failed, so
    the client should retry with the same event ids, which is safe.
    """

    def __init__(self, message: str, *, definite: bool) -> None:
        super().__init__(message)
        self.definite = definite


class Overloaded(RuntimeError):
    """More events wait for Redis than the API holds (``SLUICE_MAX_PENDING_EVENTS``): refused at once."""


def _is_definite(exc: BaseException) -> bool:
    """True when the failure happened before Redis could have applied the publish."""
    text = str(exc).lower()
    if isinstance(exc, TimeoutError):  # our own deadline: the publish may still land
        return False
    if isinstance(exc, ConnectionRefusedError) or "connection refused" in text or "error 111" in text:
        return True
    # Redis answered with an error (e.g. out of memory under noeviction): it did not apply the script.
    return type(exc).__name__ in ("ResponseError", "OutOfMemoryError") or "command not allowed when used memory" in text


#: Hears a request's outcome (:meth:`BatchingPublisher.submit_soon`): its statuses, or the error.
Settled = Callable[[list[str], "PublishError | None"], None]


@dataclass(eq=False)
class _Pending:
    events: list[JsonEvent]
    #: The events' fingerprints (sluice.events.fingerprint), in order.
    fingerprints: list[str]
    request_id: str
    #: One status per event once decided (NEW, DUPLICATE or CONFLICT).
    statuses: list[str | None]
    #: Hears the outcome, once (:meth:`BatchingPublisher.submit` gives one that answers its future).
    on_settled: Settled
    settled: bool = False
    #: Fires at the request's deadline; cancelled once it is answered.
    timer: asyncio.TimerHandle | None = None

    def settle(self, statuses: list[str] | None = None, error: PublishError | None = None) -> None:
        """Answer the request (once: a later answer is dropped)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.settled:
            return
        self.settled = True
        try:
            self.on_settled(statuses or [], error)
        except Exception:  # the other requests of its message still get their answers
            log.exception("answering request %s failed", self.request_id)


class BatchingPublisher:
    #: How long requests fail fast after Redis refused a publish, before the next publish tries Redis again.
    FAIL_FAST_S = 0.25
    #: Rounds of the script per message: each round settles at least one event, so this only bounds a
    #: pathological race between API processes re-posting the same ids.
    MAX_ROUNDS = 4
    #: Events that make a message worth sending without waiting for company: from here on a worker and Redis pay
    #: per event, not per message. Four connections of 100-event batches, workers paused (A/B, four rounds):
    #: 19,700-26,400 events/s while each message waited out the linger for four requests, 26,900-33,200 sending
    #: each at once (1.1 requests per message), and the workers drained those messages as fast
    #: (docs/performance.md, seventh steps).
    ENOUGH_EVENTS = 100

    def __init__(
        self,
        enqueue: EnqueueFn,
        *,
        max_events: int,
        linger_s: float,
        deadline_s: float = 0.8,
        max_pending_events: int = 50_000,
        backlog_linger_s: float = 0.0,
        backlogged: Callable[[], bool] = lambda: False,
        concurrency: int = 1,
        rate_linger_s: float = 0.0,
    ) -> None:
        self._enqueue = enqueue
        self._max_events = max_events
        #: Gathered events that end any linger (the message is sent at once); at most a full message.
        self._enough = min(max_events, self.ENOUGH_EVENTS)
        self._linger_s = linger_s
        self._backlog_linger_s = backlog_linger_s
        self._backlogged = backlogged
        self._rate_linger_s = rate_linger_s
        #: The gap between requests, smoothed (seconds); starts as a quiet API's.
        self._gap_s = 1.0
        self._last_arrival = 0.0
        self._deadline_s = deadline_s
        self._max_pending = max_pending_events
        self._queue: deque[_Pending] = deque()
        self._queued_events = 0
        self._wakeup = asyncio.Event()
        #: Set while ``_enough`` events wait: it ends a linger at once.
        self._gathered = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        #: Messages on their way to Redis at once (each its own connection).
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closing = False
        #: The last message carried several requests (or more were waiting): linger to fill the next one.
        self._busy = False
        # After a refused publish, fail fast for a moment rather than pile requests onto a Redis that is away.
        self._unavailable_until = 0.0
        self._last_error = ""
        self._expiry_logged = 0.0

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="sluice-publisher")

    async def submit(self, events: list[JsonEvent], fingerprints: list[str], request_id: str) -> list[str]:
        """Return once ``events`` are in Redis with their marks: one status per event, :data:`NEW` (queued),
        :data:`DUPLICATE` (already queued with this content) or :data:`CONFLICT` (another version is).
        Raises :class:`PublishError` if they could not be queued, :class:`Overloaded` if too many wait.

        A request whose task is cancelled cancels only its own future: the message it shares with other
        requests is still published."""
        done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()

        def settled(statuses: list[str], error: PublishError | None) -> None:
            if done.done():  # cancelled: its request went away
                return
            if error is None:
                done.set_result(statuses)
            else:
                done.set_exception(error)
                done.exception()  # retrieved: a request whose client went away never awaits it

        self.submit_soon(events, fingerprints, request_id, settled)
        return await done

    def submit_soon(
        self, events: list[JsonEvent], fingerprints: list[str], request_id: str, on_settled: Settled
    ) -> None:
        """:meth:`submit` without a task to await it: ``on_settled(statuses, error)`` is called once, from the
        event loop, with what :meth:`submit` would return or raise (``error`` a :class:`PublishError`). Raises
        :class:`PublishError` or :class:`Overloaded` at once, as :meth:`submit` does, for a request refused
        before it waits. (The API's single-event lane, api/http.py: a task and its future per request were a
        tenth of the API's CPU.)"""
        if self._closing:
            raise PublishError("the API is shutting down", definite=True)
        if time.monotonic() < self._unavailable_until:
            raise PublishError(f"the queue is unavailable: {self._last_error}", definite=True)
        if self._queued_events + len(events) > self._max_pending:
            raise Overloaded(f"{self._queued_events} events already wait to be queued by this API process")
        now = time.monotonic()
        # A tenth of each new gap (at most 1 s): a burst is seen within a few dozen requests, and one pause of
        # a few tens of milliseconds ends it.
        self._gap_s += 0.1 * (min(now - self._last_arrival, 1.0) - self._gap_s)
        self._last_arrival = now
        item = _Pending(events, fingerprints, request_id, [None] * len(events), on_settled)
        self._queue.append(item)
        self._count(len(events))
        self._wakeup.set()
        # Bounded from the request's arrival, not from its publish: while every slot is held by a publish to a
        # Redis that does not answer (a primary cut off from the network), requests waiting for a slot would
        # otherwise wait for one whole publish deadline and then their own. One timer, not wait_for() around a
        # shield(): those cost a request three futures and their callbacks (wait_for was 6-9 % of the API's
        # profile at 1,000 single requests/s, though an A/B could not tell the change from the machine's noise).
        item.timer = asyncio.get_running_loop().call_later(self._deadline_s, self._expire, item)

    def _expire(self, item: _Pending) -> None:
        """Answer a request whose deadline passed: refused if its events never left this process, else unknown
        (they are on their way to Redis, and may land)."""
        item.timer = None
        if item.settled:
            return
        now = time.monotonic()
        if now - self._expiry_logged > 1.0:  # at most a line a second, however many requests expire
            self._expiry_logged = now
            log.warning("requests are passing their deadline of %.1f s (%d publishes in flight, %d events waiting)",
                        self._deadline_s, len(self._in_flight), self._queued_events)  # fmt: skip
        try:
            self._queue.remove(item)
        except ValueError:
            PUBLISH_FAILURES.labels("unknown").inc()
            item.settle(error=PublishError(f"the queue did not confirm within {self._deadline_s} s", definite=False))
            return
        self._count(-len(item.events))
        PUBLISH_FAILURES.labels("refused").inc()
        item.settle(error=PublishError(
            f"no connection to the queue was free within {self._deadline_s} s (publishes in flight are stalled)",
            definite=True,
        ))  # fmt: skip

    async def close(self) -> None:
        """Publish what is queued, then stop; requests still waiting get their answer first."""
        self._closing = True
        self._wakeup.set()
        if self._runner is not None:
            await self._runner

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._queue:
                if self._closing:
                    await asyncio.gather(*self._in_flight)
                    return
                self._wakeup.clear()
                continue
            linger, quiet = self._linger()
            if linger > 0 and self._queued_events < self._enough and not self._closing:
                await self._wait_for_company(linger, quiet)
            # Several messages may be in flight: while Redis runs one script (and fsyncs), this process goes on
            # reading and validating, and Redis fsyncs the scripts that arrive together once. With every slot
            # taken, requests keep gathering here, so the next message is fuller.
            await self._slots.acquire()
            if not self._queue:  # the requests that were waiting for a slot passed their deadline meanwhile
                self._slots.release()
                continue
            batch = self._take()
            self._busy = len(batch) > 1 or bool(self._queue)
            task = asyncio.create_task(self._send(batch), name="sluice-publish")
            self._in_flight.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _send(self, batch: list[_Pending]) -> None:
        """Publish one message and answer its requests (never raises: every failure goes to them)."""
        try:
            # A deadline of our own: past it the outcome is unknown (504); the script may still land.
            sent = await asyncio.wait_for(self._publish(batch), self._deadline_s)
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the waiting requests
            log.warning("publishing %d events failed: %r", sum(len(i.events) for i in batch), exc)
            self._fail(batch, exc)
        else:
            if sent:
                TALLY.observe(PUBLISH_BATCH_EVENTS, sent)
            for item in batch:
                item.settle([s or NEW for s in item.statuses])

    def _count(self, events: int) -> None:
        """Add (negative: remove) events waiting to be published; ``_gathered`` says whether ``_enough`` wait."""
        self._queued_events += events
        if self._queued_events >= self._enough:
            self._gathered.set()
        else:
            self._gathered.clear()

    def _linger(self) -> tuple[float, float]:
        """How long to wait for more requests to join the next message (it is sent early once it holds
        ``ENOUGH_EVENTS``), and how long without a new request ends that wait early (``inf``: it does not).

        Messages waiting in the queue (the workers are behind): the longer wait, hidden behind the queue's;
        a worker pays per message more than per event, so fuller messages let it catch up, where a message
        per request would keep it behind (measured: workers behind at 260 single events/s, not at 1,100/s,
        where messages filled). It ends once no request has come for the busy linger: clients that wait for
        their answers before sending more (a few connections sending batches) have all sent theirs, and
        waiting on would only delay them (four connections of 100-event batches, workers paused: 22,000
        events/s with the whole 10 ms, 33,000 with this rule; docs/performance.md). Fast (requests at most
        half the rate linger apart, so at least two would join): the rate linger; Redis runs and fsyncs one
        script per message, so fuller messages cost it less per request (at 1,000 requests/s, 8 ms against
        none: -26 %), and a request waits at most that long. Busy (the last message was shared): a moment
        for concurrent requests. Quiet (one request at a time, an idle queue): no wait at all."""
        if self._backlogged():
            return self._backlog_linger_s, max(self._linger_s, 0.001)
        if self._rate_linger_s > 0 and 2 * self._gap_s <= self._rate_linger_s:  # 0: off
            return self._rate_linger_s, math.inf
        return (self._linger_s if self._busy else 0.0), math.inf

    async def _wait_for_company(self, linger: float, quiet: float) -> None:
        """Wait until the next message has enough events, ``linger`` has passed, or no request has come for
        ``quiet``."""
        deadline = time.monotonic() + linger
        while self._queued_events < self._enough and not self._closing:
            until = min(deadline, self._last_arrival + quiet)
            wait = until - time.monotonic()
            if wait <= 0:
                return
            # asyncio.timeout(), not wait_for(): no task per wait. Requests that arrive meanwhile move the
            # quiet limit on; the loop takes it up when this wait ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._gathered.wait()

    async def _publish(self, batch: list[_Pending]) -> int:
        """Write the batch's events that are new, in one message; settle the statuses of the others."""
        copies = _settle_within(batch)
        try:
            return await self._publish_rounds(batch)
        finally:
            # A second copy of an id in this message fares as its first copy did.
            for item, i, first, j in copies:
                item.statuses[i] = CONFLICT if first.statuses[j] == CONFLICT else DUPLICATE

    async def _publish_rounds(self, batch: list[_Pending]) -> int:
        for _ in range(self.MAX_ROUNDS):
            todo = [(item, i) for item in batch for i, status in enumerate(item.statuses) if status is None]
            if not todo:
                return 0
            accepted_at = time.time()
            events = [item.events[i] for item, i in todo]
            msg = message.build(
                events,
                accepted_at=accepted_at,
                request_ids=list(dict.fromkeys(item.request_id for item, _ in todo)),
            )
            marks = [
                (event["event_id"], mark_value(event, accepted_at, item.fingerprints[i]))
                for event, (item, i) in zip(events, todo, strict=True)
            ]
            statuses = await self._enqueue(msg, marks)
            if not statuses:
                for item, i in todo:
                    item.statuses[i] = NEW
                return len(todo)
            # Nothing was written: settle the duplicates and conflicts, and send the rest again.
            for (item, i), status in zip(todo, statuses, strict=True):
                if status != NEW:
                    item.statuses[i] = status
        raise PublishError("the same event ids kept changing while being queued", definite=True)

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        definite = _is_definite(exc) if not isinstance(exc, PublishError) else exc.definite
        PUBLISH_FAILURES.labels("refused" if definite else "unknown").inc()
        if definite and not isinstance(exc, PublishError):
            # Redis refused (away, or full): the next requests would be refused too. A timeout is a slow Redis
            # (one long fsync), not an absent one: the next publish may well land, so it is tried. (Failing fast
            # after timeouts too refused 1 % of a ring test's requests while one Cassandra node was down.)
            self._unavailable_until = time.monotonic() + self.FAIL_FAST_S
        self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        error = PublishError(f"could not queue events: {self._last_error}", definite=definite)
        for item in batch:
            item.settle(error=error)

    def _take(self) -> list[_Pending]:
        """Whole requests, oldest first, up to ``max_events`` (but always at least one request)."""
        taken: list[_Pending] = []
        count = 0
        while self._queue and (not taken or count + len(self._queue[0].events) <= self._max_events):
            item = self._queue.popleft()
            taken.append(item)
            count += len(item.events)
        self._count(-count)
        if not self._queue:
            self._wakeup.clear()
        return taken


_COPY = "copy"


def _settle_within(batch: list[_Pending]) -> list[tuple[_Pending, int, _Pending, int]]:
    """One id twice in one message: the first copy is sent; a later one with other content is a conflict,
    and one with the same content is returned, to fare as the first copy does."""
    first: dict[str, tuple[_Pending, int]] = {}
    copies: list[tuple[_Pending, int, _Pending, int]] = []
    for item in batch:
        for i, event in enumerate(item.events):
            seen = first.setdefault(event["event_id"], (item, i))
            if seen[0] is item and seen[1] == i:
                continue
            if seen[0].fingerprints[seen[1]] == item.fingerprints[i]:
                item.statuses[i] = _COPY
                copies.append((item, i, *seen))
            else:
                item.statuses[i] = CONFLICT
    return copies

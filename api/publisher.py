"""Publishing accepted events to the queue: concurrent requests share one Celery message.

Celery's publish is synchronous and costs far more than one Redis round trip, so paying it per request on
the event loop would cap the API at a few hundred requests per second. Instead each request hands its events
to :class:`BatchingPublisher` and waits; one background loop gathers what arrived (waiting at most
``linger`` for more, and not at all once a message is full), publishes it as one task from a worker thread,
and only then wakes the waiting requests. So a request is answered 202 only once its events are in Redis,
and a request's events always travel in one message: all of them are queued, or none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sluice.metrics import PUBLISH_BATCH_EVENTS, PUBLISH_FAILURES

log = logging.getLogger(__name__)

JsonEvent = dict[str, Any]
#: Publishes one message (blocking): the events, the acceptance time (epoch seconds) and request ids.
PublishFn = Callable[[list[JsonEvent], float, list[str]], None]


class PublishError(RuntimeError):
    """The events could not be written to the queue.

    ``definite`` says the events are certainly not queued (Redis refused the connection or the command).
    Otherwise the outcome is unknown: the command may have reached Redis before the connection failed, so
    the client should retry with the same event ids, which is safe.
    """

    def __init__(self, message: str, *, definite: bool) -> None:
        super().__init__(message)
        self.definite = definite


def _is_definite(exc: BaseException) -> bool:
    """True when the failure happened before Redis could have applied the publish."""
    text = str(exc).lower()
    if isinstance(exc, TimeoutError):  # our own deadline: the publish may still land
        return False
    if isinstance(exc, ConnectionRefusedError) or "connection refused" in text or "error 111" in text:
        return True
    # Redis answered with an error (e.g. out of memory under noeviction): it did not apply the command.
    return type(exc).__name__ == "ResponseError" or "command not allowed when used memory" in text


@dataclass
class _Pending:
    events: list[JsonEvent]
    request_id: str
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BatchingPublisher:
    #: How long requests fail fast after a failed publish, before the next publish tries Redis again.
    FAIL_FAST_S = 0.25

    def __init__(self, publish: PublishFn, *, max_events: int, linger_s: float, deadline_s: float = 0.8) -> None:
        self._publish = publish
        self._max_events = max_events
        self._linger_s = linger_s
        self._deadline_s = deadline_s
        self._queue: deque[_Pending] = deque()
        self._queued_events = 0
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        # One thread: messages go out one at a time, and requests arriving meanwhile form the next batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-publish")
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        # After a failed publish, fail fast for a moment rather than pile requests onto a Redis that is away.
        self._unavailable_until = 0.0
        self._last_error = ""

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="sluice-publisher")

    async def submit(self, events: list[JsonEvent], request_id: str) -> None:
        """Return once ``events`` are in Redis; raise :class:`PublishError` if they could not be queued."""
        if self._closing:
            raise PublishError("the API is shutting down", definite=True)
        if time.monotonic() < self._unavailable_until:
            raise PublishError(f"the queue is unavailable: {self._last_error}", definite=True)
        item = _Pending(events, request_id)
        self._queue.append(item)
        self._queued_events += len(events)
        self._wakeup.set()
        if self._queued_events >= self._max_events:
            self._full.set()
        # Shielded: a client that disconnects must not cancel a publish other requests share.
        await asyncio.shield(item.done)

    async def close(self) -> None:
        """Publish what is queued, then stop; requests still waiting get their answer first."""
        self._closing = True
        self._wakeup.set()
        if self._runner is not None:
            await self._runner
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                continue
            if self._linger_s > 0 and self._queued_events < self._max_events and not self._closing:
                # Give concurrent requests a moment to join this message, unless it is already full.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._linger_s)
            batch = self._take()
            events = [event for item in batch for event in item.events]
            accepted_at = time.time()
            try:
                # A deadline of our own: the clients' retries (redis-py retries some errors with backoff) must not
                # hold requests for seconds. Past it the outcome is unknown (504), and the thread may still finish.
                await asyncio.wait_for(
                    loop.run_in_executor(
                        self._executor, self._publish, events, accepted_at, [item.request_id for item in batch]
                    ),
                    self._deadline_s,
                )
            except Exception as exc:  # noqa: BLE001 - every failure is reported to the waiting requests
                log.warning("publishing %d events failed: %r", len(events), exc)
                PUBLISH_FAILURES.labels("refused" if _is_definite(exc) else "unknown").inc()
                self._unavailable_until = time.monotonic() + self.FAIL_FAST_S
                self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                error = PublishError(f"could not queue events: {self._last_error}", definite=_is_definite(exc))
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(error)
                        # Mark retrieved: a request whose client went away never awaits it.
                        item.done.exception()
            else:
                PUBLISH_BATCH_EVENTS.observe(len(events))
                for item in batch:
                    if not item.done.done():
                        item.done.set_result(None)

    def _take(self) -> list[_Pending]:
        """Whole requests, oldest first, up to ``max_events`` (but always at least one request)."""
        taken: list[_Pending] = []
        count = 0
        while self._queue and (not taken or count + len(self._queue[0].events) <= self._max_events):
            item = self._queue.popleft()
            taken.append(item)
            count += len(item.events)
        self._queued_events -= count
        if self._queued_events < self._max_events:
            self._full.clear()
        if not self._queue:
            self._wakeup.clear()
        return taken

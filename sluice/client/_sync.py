"""The blocking client: ``send`` queues in memory, a background thread batches, sends and retries."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import httpx

from ._buffer import Buffer, Limits
from ._events import prepare
from ._protocol import BATCH_PATH, Delivery, Item, Send, deliver
from ._retry import RetryPolicy
from ._types import (
    ClientClosed,
    ErrorCallback,
    Event,
    FlushResult,
    QueueFull,
    QueuePolicy,
    Rejection,
)

log = logging.getLogger("sluice.client")

USER_AGENT = "sluice-client/1"


def report(on_error: ErrorCallback | None, result: FlushResult, items: list[Item]) -> None:
    """Tell ``on_error`` about each rejected event (one call per event: each has its own reason)."""
    if on_error is None or not result.rejected:
        return
    events = {item.event_id: item.event for item in items}
    for rejection in result.rejected:
        call(on_error, rejection, [events[rejection.event_id]])


def call(on_error: ErrorCallback, error: Rejection | QueueFull, events: list[dict[str, Any]]) -> None:
    try:
        on_error(error, events)
    except Exception:
        # The callback is the producer's code: its failure must not stop the sender (and hang flush).
        log.exception("on_error raised; ignored")


def dropped(item: Item, limit: int) -> tuple[QueueFull, Rejection]:
    message = f"the client's queue holds {limit} unanswered events (max_queued_events); dropped (drop_new)"
    return QueueFull(message), Rejection(item.event_id, None, "dropped", message)


def failed(items: list[Item], exc: BaseException) -> FlushResult:
    """A batch the sender could not handle because of a bug of ours: report it, never lose it silently."""
    message = f"the client failed while sending: {type(exc).__name__}: {exc}"
    return FlushResult([], [Rejection(item.event_id, None, "client_error", message, (), True) for item in items])


class Client:
    """Sends events to Sluice in batches from a background thread.

    ``send(event)`` queues an event and returns its id; ``flush()`` waits until every event queued so far
    is answered and returns what was accepted and rejected since the last flush. Use it as a context
    manager (``with Client(...) as client:``): leaving the block flushes and closes. Behaviour in full:
    docs/client.md.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_batch_events: int = 1000,
        max_batch_bytes: int = 1_000_000,
        linger_s: float = 0.05,
        gzip: bool = True,
        max_queued_events: int = 100_000,
        when_full: QueuePolicy = "block",
        block_timeout_s: float | None = 30.0,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        on_error: ErrorCallback | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if when_full not in ("block", "raise", "drop_new"):
            raise ValueError(f"when_full must be 'block', 'raise' or 'drop_new', not {when_full!r}")
        self._buffer = Buffer(Limits(max_batch_events, max_batch_bytes, linger_s, max_queued_events))
        self._when_full = when_full
        self._block_timeout_s = block_timeout_s
        self._gzip = gzip
        self._retry = retry or RetryPolicy()
        self._on_error = on_error
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT},
            timeout=timeout_s,
            transport=transport,
        )
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="sluice-client-sender", daemon=True)
        self._thread.start()

    # --- the producer's side ---------------------------------------------------------------------------

    def send(self, event: Event) -> UUID:
        """Queue one event; its ``event_id`` (a new uuid4 if it has none). Raises :class:`QueueFull` when
        the queue is full and the policy is ``raise`` (or ``block`` past ``block_timeout_s``)."""
        event_id, data, encoded = prepare(event)
        item = Item(event_id, data, encoded)
        with self._cond:
            if self._closing:
                raise ClientClosed("send() after close()")
            if not self._buffer.has_room and not self._wait_for_room():
                error, rejection = dropped(item, self._buffer.limits.max_queued_events)
                self._buffer.results.rejected.append(rejection)
            else:
                self._buffer.add(item, time.monotonic())
                self._cond.notify_all()
                return event_id
        if self._on_error is not None:
            call(self._on_error, error, [data])
        return event_id

    def _wait_for_room(self) -> bool:
        """With the lock held: True once there is room, False to drop the event (``drop_new``)."""
        if self._when_full == "drop_new":
            return False
        limit = self._buffer.limits.max_queued_events
        if self._when_full == "raise":
            raise QueueFull(f"the client's queue holds {limit} unanswered events (max_queued_events)")
        if not self._cond.wait_for(lambda: self._buffer.has_room or self._closing, self._block_timeout_s):
            raise QueueFull(f"no room in the client's queue ({limit} events) after {self._block_timeout_s} s")
        if self._closing:
            raise ClientClosed("the client was closed while send() waited for room")
        return True

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Send everything queued so far now, wait until all of it is answered, and return what was accepted
        and rejected since the previous flush. ``TimeoutError`` after ``timeout`` seconds (nothing is lost:
        a later flush returns it)."""
        with self._cond:
            target = self._buffer.queued_upto
            self._buffer.flush_upto = max(self._buffer.flush_upto, target)
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._buffer.answered_upto >= target, timeout):
                raise TimeoutError(f"flush: {self._buffer.unanswered} events still unanswered after {timeout} s")
            return self._buffer.results._take()

    def close(self) -> FlushResult:
        """Flush, stop the sender and close the connections; returns the last flush's result. Idempotent
        (a second call returns an empty result)."""
        with self._cond:
            if self._closing:
                already = True
            else:
                already, self._closing = False, True
        if already:
            self._thread.join()
            return FlushResult()
        result = self.flush()
        with self._cond:
            self._cond.notify_all()
        self._thread.join()
        self._http.close()
        return result

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- the sender thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while (wait := self._buffer.wait_s(time.monotonic())) != 0.0:
                    if wait is None and self._closing:
                        return
                    self._cond.wait(wait)
                items, last = self._buffer.take()
            try:
                result = self._drive(deliver(items, self._retry, self._gzip))
            except Exception as exc:
                log.exception("sending a batch of %d events failed", len(items))
                result = failed(items, exc)
            report(self._on_error, result, items)
            with self._cond:
                self._buffer.answered(last, result)
                self._cond.notify_all()

    def _drive(self, delivery: Delivery) -> FlushResult:
        action = next(delivery)
        while True:
            reply: httpx.Response | Exception | None = None
            if isinstance(action, Send):
                try:
                    reply = self._http.post(BATCH_PATH, content=action.body, headers=dict(action.headers))
                except httpx.TransportError as exc:
                    reply = exc
            else:
                self._sleep(action.seconds)
            try:
                action = delivery.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

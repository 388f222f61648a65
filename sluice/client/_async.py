"""The asyncio client: the same queue and rules as :class:`~sluice.client.Client`, sent by a task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self
from uuid import UUID

import httpx

from ._buffer import Buffer, Limits
from ._events import prepare
from ._protocol import BATCH_PATH, Delivery, Item, Send, deliver
from ._retry import RetryPolicy
from ._sync import USER_AGENT, call, dropped, failed, report
from ._types import ClientClosed, ErrorCallback, Event, FlushResult, QueueFull, QueuePolicy

log = logging.getLogger("sluice.client")


class AsyncClient:
    """``await client.send(event)``, ``await client.flush()``, ``async with AsyncClient(...) as client``.

    The sender task starts with the first ``send`` on the running loop. ``on_error`` is called on that loop:
    it must not block.
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
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
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
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT},
            timeout=timeout_s,
            transport=transport,
        )
        # Made lazily: an asyncio.Condition belongs to the loop it is first used on.
        self._cond_: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def _cond(self) -> asyncio.Condition:
        if self._cond_ is None:
            self._cond_ = asyncio.Condition()
        return self._cond_

    async def send(self, event: Event) -> UUID:
        """Queue one event; its ``event_id``. See :meth:`Client.send`."""
        event_id, data, encoded = prepare(event)
        item = Item(event_id, data, encoded)
        async with self._cond:
            if self._closing:
                raise ClientClosed("send() after aclose()")
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run(), name="sluice-client-sender")
            if self._buffer.has_room or await self._wait_for_room():
                self._buffer.add(item, time.monotonic())
                self._cond.notify_all()
                return event_id
            error, rejection = dropped(item, self._buffer.limits.max_queued_events)
            self._buffer.results.rejected.append(rejection)
        if self._on_error is not None:
            call(self._on_error, error, [data])
        return event_id

    async def _wait_for_room(self) -> bool:
        if self._when_full == "drop_new":
            return False
        limit = self._buffer.limits.max_queued_events
        if self._when_full == "raise":
            raise QueueFull(f"the client's queue holds {limit} unanswered events (max_queued_events)")
        try:
            await asyncio.wait_for(
                self._cond.wait_for(lambda: self._buffer.has_room or self._closing), self._block_timeout_s
            )
        except TimeoutError:
            raise QueueFull(f"no room in the client's queue ({limit} events) after {self._block_timeout_s} s") from None
        if self._closing:
            raise ClientClosed("the client was closed while send() waited for room")
        return True

    async def flush(self) -> FlushResult:
        """See :meth:`Client.flush`; bound it with ``asyncio.timeout`` (nothing is lost if it expires: a
        later flush returns it)."""
        async with self._cond:
            target = self._buffer.queued_upto
            self._buffer.flush_upto = max(self._buffer.flush_upto, target)
            self._cond.notify_all()
            await self._cond.wait_for(lambda: self._buffer.answered_upto >= target)
            return self._buffer.results._take()

    async def aclose(self) -> FlushResult:
        """Flush, stop the sender task, close the connections. Idempotent."""
        if self._closing:
            if self._task is not None:
                await asyncio.shield(self._task)
            return FlushResult()
        self._closing = True
        result = await self.flush()
        async with self._cond:
            self._cond.notify_all()
        if self._task is not None:
            await self._task
        await self._http.aclose()
        return result

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self) -> None:
        while True:
            async with self._cond:
                while (wait := self._buffer.wait_s(time.monotonic())) != 0.0:
                    if wait is None and self._closing:
                        return
                    # Woken by send/flush/aclose, or when the oldest event has lingered long enough.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), wait)
                items, last = self._buffer.take()
            try:
                result = await self._drive(deliver(items, self._retry, self._gzip))
            except Exception as exc:
                log.exception("sending a batch of %d events failed", len(items))
                result = failed(items, exc)
            report(self._on_error, result, items)
            async with self._cond:
                self._buffer.answered(last, result)
                self._cond.notify_all()

    async def _drive(self, delivery: Delivery) -> FlushResult:
        action = next(delivery)
        while True:
            reply: httpx.Response | Exception | None = None
            if isinstance(action, Send):
                try:
                    reply = await self._http.post(BATCH_PATH, content=action.body, headers=dict(action.headers))
                except httpx.TransportError as exc:
                    reply = exc
            else:
                await self._sleep(action.seconds)
            try:
                action = delivery.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

"""uvicorn's HTTP protocol (httptools) with the connection limits uvicorn does not have.

What uvicorn 0.54 does, measured against the real API (``tests/test_connections.py``): its keep-alive timer
(``timeout_keep_alive``) only starts after a response, and any byte received cancels it; nothing times a
connection that never sends a request, headers that arrive a byte at a time, or a body that never ends; and
``limit_concurrency`` answers 503 to requests over the limit but leaves every connection open. So one client
could hold thousands of descriptors without a key. This protocol adds, each from a setting:

- ``SLUICE_HTTP_IDLE_TIMEOUT_S``: a connection with no request under way is closed after this long without a
  byte, a new one as well as a kept-alive one (uvicorn's ``timeout_keep_alive`` after a response, our timer
  before the first request). Closed silently: a 408 on an idle connection could be read by a client as the
  answer to the request it sends next on it.
- ``SLUICE_HTTP_HEADER_TIMEOUT_S``: from a request's first byte to the end of its headers; then 408.
- ``SLUICE_HTTP_BODY_TIMEOUT_S``: from the end of the headers to the end of the body; then 408.
- ``SLUICE_HTTP_MAX_CONNECTIONS``: open connections per API process; a connection over it is closed as soon
  as it is accepted (before it costs more than its descriptor for a moment).

A 408 is our usual JSON error and closes the connection. Time spent by the app on a request (after its body)
is not limited here: the routes bound their own waits (the publish deadline, Cassandra's request timeout).

It also sends a response's head and its body in one write where uvicorn makes two (:class:`_HeadWithBody`):
each write is a ``send`` system call. (With the ingest trims of the same commit, the API's CPU per single
request fell 4 %: docs/performance.md, fourth steps.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from sluice.settings import get_settings

log = logging.getLogger("sluice.api")

_settings = get_settings()


def _timeout_response(what: str, seconds: float, setting: str) -> bytes:
    body = orjson.dumps({"error": {
        "code": "request_timeout",
        "message": f"the request's {what} did not arrive within {seconds:g} s ({setting}); connection closed",
        "details": [{"loc": [what], "msg": f"not complete within {seconds:g} s", "type": "timeout"}],
    }})  # fmt: skip
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
    )
    return head + body


class _HeadWithBody:
    """One request's view of the connection's transport: the response's head (status line and headers) is held
    until the first write of its body, and both go out in one ``write``.

    uvicorn's cycle writes the head when the app sends ``http.response.start`` and the body when it sends
    ``http.response.body``: two writes, and so two system calls, for every small response. Every response
    but one to ``HEAD`` writes its body after its head (an empty body too: uvicorn writes ``b""``, or the last
    chunk), so the head is never held for long; ``HEAD`` requests are not given this view. A write made
    before the response starts (``100 Continue``) goes out at once; closing sends what is held first."""

    __slots__ = ("_cycle", "_head_seen", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._held: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif not self._head_seen and self._cycle.response_started:
            # The cycle sets response_started just before it writes the head: hold it for the body.
            self._head_seen = True
            self._held = data
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._held is not None:
            self._transport.write(self._held)
            self._held = None
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection; see the module's doc. One timer at a time: idle, then headers, then body."""

    _last_refusal_log = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float, fire: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- connection -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > _settings.http_max_connections:
            now = time.monotonic()
            cls = type(self)
            if now - cls._last_refusal_log > 1.0:  # at most one line a second, however many are refused
                cls._last_refusal_log = now
                log.warning("closing new connections: %d open, over SLUICE_HTTP_MAX_CONNECTIONS (%d)",
                            len(self.connections) - 1, _settings.http_max_connections)  # fmt: skip
            transport.close()
            return
        self._arm(_settings.http_idle_timeout_s, self._idle_too_long)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- parser callbacks (httptools) -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(_settings.http_header_timeout_s, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        self._arm(_settings.http_body_timeout_s, self._body_too_slow)
        before = self.cycle
        super().on_headers_complete()
        # The cycle just made for this request (its task has not run yet; an upgrade makes none). A response to
        # HEAD writes no body.
        cycle = self.cycle
        if cycle is not None and cycle is not before and self.scope["method"] != "HEAD":
            cycle.transport = _HeadWithBody(self.transport, cycle)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # --- timers ---------------------------------------------------------------------------------------
    def _idle_too_long(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _headers_too_slow(self) -> None:
        self._timer = None
        # A pipelined request behind one whose answer is still being written: no 408 into the middle of it.
        busy = self.cycle is not None and not self.cycle.response_complete
        answer = _timeout_response("headers", _settings.http_header_timeout_s, "SLUICE_HTTP_HEADER_TIMEOUT_S")
        self._close(None if busy else answer)

    def _body_too_slow(self) -> None:
        self._timer = None
        cycle = self.cycle
        answer = None
        if cycle is not None and not cycle.response_started:
            answer = _timeout_response("body", _settings.http_body_timeout_s, "SLUICE_HTTP_BODY_TIMEOUT_S")
            # The app is waiting for the rest of the body: it now hears a disconnect, and anything it sends
            # is dropped (uvicorn's cycle writes nothing once disconnected).
            cycle.disconnected = True
            cycle.message_event.set()
        self._close(answer)

    def _close(self, answer: bytes | None) -> None:
        if self.transport.is_closing():
            return
        if answer is not None:
            self.transport.write(answer)
        self.transport.close()

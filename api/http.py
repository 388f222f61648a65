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

**The ingest lane.** A plain ingest request (``POST /v1/events`` or ``/v1/events/batch``, its body's length
given, nothing pipelined ahead of it) is answered by this protocol itself, not through ASGI: its body is
collected here, :meth:`api.ingest.FastIngest.respond` (the same handlers, checks and errors) makes the answer,
and its head and body go out in one write. A single event (``POST /v1/events``) does not even get a task:
:meth:`api.ingest.FastIngest.start_single` runs its checks when its body is complete and hands the event to
the publisher with a callback that writes the answer (a gzip body, or one that may repeat a key, takes the
task). uvicorn's request cycle, its task, its ``receive``/``send``
messages and the proxy-headers middleware cost an ASGI request about 0.08 ms of CPU on the development
machine (a trivial ASGI app on uvicorn: 0.115 ms per request; the same answer from a bare asyncio protocol:
0.034). The lane stands as the connection's cycle while it is under way, so what uvicorn does around a cycle
(queueing a pipelined request, a lost connection, a graceful shutdown, the keep-alive timer) applies to it
unchanged. Anything else (chunked, oversized, ``Expect: 100-continue``, a query string) goes through ASGI to
:class:`~api.ingest.FastIngest`, which answers it with the same handlers.

It also sends a response's head and its body in one write where uvicorn makes two (:class:`_HeadWithBody`):
each write is a ``send`` system call. (With the ingest trims of the same commit, the API's CPU per single
request fell 4 %: docs/performance.md, fourth steps.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from api.ingest import SINGLE, FastIngest, Handler, IngestRequest, record_http
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


#: uvicorn's default headers (``server``, ``date``), as written: (the list they came from, its bytes).
_DEFAULT_HEAD: tuple[object, bytes] = (None, b"")


def _default_head(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default headers as they go into a response head; made again only when uvicorn makes a new
    list (its ``date`` header, once a second)."""
    global _DEFAULT_HEAD
    made_from, head = _DEFAULT_HEAD
    if made_from is not headers:
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        _DEFAULT_HEAD = (headers, head)
    return head


class _NoEvent:
    """What uvicorn sets on a cycle's ``message_event`` when the connection goes: a lane waits on nothing."""

    __slots__ = ()

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class _Lane:
    """One ingest request answered by the protocol itself (:meth:`GuardedHttpToolsProtocol._serve`).

    It stands as the connection's ``cycle`` while it is under way, with the attributes uvicorn's protocol
    reads and sets on one: so a request pipelined behind it is queued until it is answered, a lost connection
    marks it ``disconnected``, and a graceful shutdown clears ``keep_alive``."""

    __slots__ = ("body", "disconnected", "handler", "headers", "keep_alive", "path", "response_complete")

    response_started = False
    message_event = _NO_EVENT

    def __init__(self, path: str, handler: Handler, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.path = path
        self.handler = handler
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = b""
        self.disconnected = False
        self.response_complete = False

    async def receive(self) -> dict[str, Any]:
        """The request's ASGI ``receive``: the whole body at once (it was read before the lane started)."""
        body, self.body = self.body, b""
        return {"type": "http.request", "body": body, "more_body": False}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection; see the module's doc. One timer at a time: idle, then headers, then body."""

    _last_refusal_log = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        #: The app that answers ingest requests in the lane (None: every request goes through ASGI).
        self._ingest = _find_ingest(self.app)

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
        lane = self._lane()
        if lane is not None:
            self.cycle = lane  # type: ignore[assignment]
            return
        before = self.cycle
        super().on_headers_complete()
        # The cycle just made for this request (its task has not run yet; an upgrade makes none). A response to
        # HEAD writes no body.
        cycle = self.cycle
        if cycle is not None and cycle is not before and self.scope["method"] != "HEAD":
            cycle.transport = _HeadWithBody(self.transport, cycle)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        lane: object = self.cycle
        if type(lane) is _Lane:
            lane.body += body  # at most SLUICE_MAX_BODY_BYTES: its Content-Length said so
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        lane: object = self.cycle
        if type(lane) is _Lane:
            ingest = self._ingest
            assert ingest is not None
            # A single event is answered without a task (FastIngest.start_single), unless it needs one.
            if lane.path == SINGLE and ingest.start_single(
                lane.headers, lane.body, functools.partial(self._finish, lane, time.perf_counter())
            ):
                return
            task = self.loop.create_task(self._serve(lane))
            task.add_done_callback(self.tasks.discard)  # the server waits for these on a graceful shutdown
            self.tasks.add(task)
            return
        super().on_message_complete()

    # --- the ingest lane ------------------------------------------------------------------------------
    def _lane(self) -> _Lane | None:
        """A lane for this request if it is a plain ingest request, else None (ASGI answers it).

        Plain: ``POST`` to an ingest route's exact path over HTTP/1.1, its length given by a Content-Length
        within SLUICE_MAX_BODY_BYTES, no ``Expect: 100-continue``, no request of the connection still being
        answered. Everything else (a chunked or oversized body, a query string, a pipelined request) goes the
        long way, where the same handlers answer it."""
        ingest = self._ingest
        if ingest is None or self.expect_100_continue or self.parser.get_method() != b"POST":
            return None
        target = ingest.targets.get(self.url)
        if target is None or (self.cycle is not None and not self.cycle.response_complete):
            return None
        if self.parser.get_http_version() != "1.1" or self.parser.should_upgrade():
            return None
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                return None
        if length is None or not length.isdigit() or int(length) > _settings.max_body_bytes:
            return None
        return _Lane(target[0], target[1], self.headers, self.parser.should_keep_alive())

    async def _serve(self, lane: _Lane) -> None:
        """Answer a lane's request with :meth:`FastIngest.respond` (the same handlers as ASGI), written in one
        ``write``; then what uvicorn does once a response is complete."""
        assert self._ingest is not None
        started = time.perf_counter()
        status, headers, body = 500, [], b""
        try:
            scope: dict[str, Any] = {
                "type": "http", "http_version": "1.1", "method": "POST", "scheme": self.scheme,
                "path": lane.path, "raw_path": lane.path.encode(), "root_path": "", "query_string": b"",
                "headers": lane.headers, "server": self.server, "client": self.client, "app": self._ingest.app,
                "state": {},
            }  # fmt: skip
            request = IngestRequest(scope, lane.receive)
            response = await self._ingest.respond(request, lane.path, lane.handler)
            status, headers, body = response.status_code, response.raw_headers, response.body  # type: ignore[assignment]
        finally:
            self._finish(lane, started, status, headers, body)

    def _finish(
        self, lane: _Lane, started: float, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Write a lane's answer in one ``write`` (unless its client has gone), count it, and do what uvicorn
        does once a response is complete. Never raises: it ends every lane, however its answer was made."""
        try:
            if not lane.disconnected and not self.transport.is_closing():
                head = [STATUS_LINE[status], _default_head(self.server_state.default_headers)]
                for name, value in headers:
                    head += (name, b": ", value, b"\r\n")
                if not lane.keep_alive:
                    head.append(b"connection: close\r\n")
                head.append(b"\r\n")
                head.append(body)
                self.transport.write(b"".join(head))
        except Exception:
            log.exception("writing the answer to POST %s failed; closing the connection", lane.path)
            lane.keep_alive = False
        finally:
            lane.response_complete = True
            record_http(lane.path, "POST", status, time.perf_counter() - started)
            if not lane.keep_alive:
                self.transport.close()
            self.on_response_complete()

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


def _find_ingest(app: Any) -> FastIngest | None:
    """The :class:`FastIngest` that uvicorn serves, under its own middleware (``.app`` down the chain)."""
    for _ in range(8):
        if isinstance(app, FastIngest):
            return app
        app = getattr(app, "app", None)
    return None

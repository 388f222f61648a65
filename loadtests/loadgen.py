"""A lean HTTP/1.1 load generator: asyncio protocols on raw keep-alive connections, pre-serialised requests.

Locust (gevent, a Python HTTP client per user) spends a lot of CPU per request, and on a small machine that
CPU is taken from the pipeline it measures. Here every request is a ready ``bytes`` object built before the
clock starts, a connection is an :class:`asyncio.Protocol` that parses only the status line and
``content-length``, and no task or future is made per request. Measured on the 2-core development machine:
about 5% of a core fixed (the 1 ms scheduling tick) plus about 0.1 ms per request; every run reports its own
cost (``generator_cpu_pct_of_core``).

Open loop (``rate`` set): request *i* is due at ``start + i / rate`` whatever happened before; when no
connection is free it waits in a backlog, and its latency is counted from its due time, so a stalled server
shows up as latency instead of silently lowering the offered load (no coordinated omission). Closed loop
(``rate=None``): each connection sends its next request as soon as the previous one is answered.
"""

from __future__ import annotations

import asyncio
import re
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from loadtests.common import percentile

_CONTENT_LENGTH = re.compile(rb"\r\n[Cc]ontent-[Ll]ength:[ \t]*(\d+)")

#: Called for every answered request: (request index, status, body, perf_counter when answered).
OnResponse = Callable[[int, int, bytes, float], None]


def http_request(
    method: str, path: str, host: str, port: int, api_key: str, body: bytes = b"", *, authorization: str | None = None
) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {authorization or 'Bearer ' + api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Result:
    planned: int = 0
    sent: int = 0
    answered: int = 0
    ok: int = 0
    #: Requests answered with another status, or whose connection failed.
    failed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    #: Milliseconds from the due time (open loop) or the send time (closed loop) to the answer.
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    #: Most requests waiting for a free connection at once (open loop): > 0 means the server fell behind.
    max_backlog: int = 0
    started: float = 0.0
    first_due: float = 0.0
    last_due: float = 0.0
    finished: float = 0.0
    cpu_s: float = 0.0

    @property
    def wall_s(self) -> float:
        return max(1e-9, self.finished - self.started)

    @property
    def achieved_rps(self) -> float:
        """Requests answered OK per second of the sending window (first due time to last answer)."""
        return self.ok / max(1e-9, self.finished - self.first_due)

    def quantile_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        lat = sorted(self.latencies_ms)
        return {
            "planned": self.planned,
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "achieved_rps": round(self.achieved_rps, 1),
            "p50_ms": round(percentile(lat, 0.50), 2),
            "p90_ms": round(percentile(lat, 0.90), 2),
            "p99_ms": round(percentile(lat, 0.99), 2),
            "max_ms": round(lat[-1], 2) if lat else 0.0,
            "max_backlog": self.max_backlog,
            "wall_s": round(self.wall_s, 2),
            "generator_cpu_s": round(self.cpu_s, 2),
            "generator_cpu_pct_of_core": round(100 * self.cpu_s / self.wall_s, 1),
        }


class _Connection(asyncio.Protocol):
    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head_len = -1
        self.body_len = 0
        self.status = 0
        self.index = -1
        self.since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, index: int, since: float) -> None:
        assert self.transport is not None
        self.index = index
        self.since = since
        self.transport.write(self.gen.requests[index])

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.head_len < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[: end + 2])
                self.status = int(head[9:12])
                m = _CONTENT_LENGTH.search(head)
                self.body_len = int(m.group(1)) if m else 0
                self.head_len = end + 4
            total = self.head_len + self.body_len
            if len(buf) < total:
                return
            body = bytes(buf[self.head_len : total])
            del buf[:total]
            self.head_len = -1
            index, self.index = self.index, -1
            self.gen.answered(self, index, self.status, body)
            if not buf:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self, exc)


class Generator:
    """One run over ``requests``: open loop at ``rate`` requests/s, or closed loop when ``rate`` is None."""

    def __init__(
        self,
        host: str,
        port: int,
        requests: Sequence[bytes],
        *,
        connections: int,
        rate: float | None = None,
        max_seconds: float = 60.0,
        ok_status: int = 202,
        on_response: OnResponse | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.requests = requests
        self.connections = connections
        self.rate = rate
        self.max_seconds = max_seconds
        self.ok_status = ok_status
        self.on_response = on_response
        self.result = Result(planned=len(requests))
        self._idle: deque[_Connection] = deque()
        self._live: set[_Connection] = set()
        self._backlog: deque[tuple[int, float]] = deque()
        self._next = 0
        self._outstanding = 0
        self._dispatch_done = False
        self._running = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_done: asyncio.Future[None] | None = None
        self._deadline = 0.0

    # --- connection events ------------------------------------------------------------------------
    def answered(self, conn: _Connection, index: int, status: int, body: bytes) -> None:
        now = time.perf_counter()
        res = self.result
        res.answered += 1
        res.statuses[status] += 1
        res.latencies_ms.append((now - conn.since) * 1000)
        if status == self.ok_status:
            res.ok += 1
        else:
            res.failed += 1
        if self.on_response is not None:
            self.on_response(index, status, body, now)
        self._outstanding -= 1
        self._feed(conn)

    def lost(self, conn: _Connection, exc: Exception | None) -> None:
        self._live.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.index >= 0 and self._running:  # after the run, in-flight requests were already counted
            self.result.failed += 1
            self.result.errors[type(exc).__name__ if exc else "connection closed"] += 1
            self._outstanding -= 1
            conn.index = -1
        if self._running and not self._finished() and time.perf_counter() < self._deadline:
            task = asyncio.get_running_loop().create_task(self._connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._check_done()

    # --- dispatch ----------------------------------------------------------------------------------------
    def _feed(self, conn: _Connection) -> None:
        """Give a free connection its next request, or park it."""
        if conn not in self._live:
            return
        if not self._running:
            self._idle.append(conn)
            return
        if self._backlog:
            index, due = self._backlog.popleft()
            self._start(conn, index, due)
        elif self.rate is None and self._next < len(self.requests) and time.perf_counter() < self._deadline:
            index = self._next
            self._next += 1
            self._start(conn, index, time.perf_counter())
        else:
            self._idle.append(conn)
        self._check_done()

    def _start(self, conn: _Connection, index: int, since: float) -> None:
        self._outstanding += 1
        self.result.sent += 1
        conn.send(index, since)

    def _finished(self) -> bool:
        return self._dispatch_done and self._outstanding == 0 and not self._backlog

    def _check_done(self) -> None:
        if not self._running:
            return
        if self.rate is None and (self._next >= len(self.requests) or time.perf_counter() >= self._deadline):
            self._dispatch_done = True
        if self._all_done is not None and not self._all_done.done() and self._finished():
            self._all_done.set_result(None)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError as exc:
            self.result.errors[f"connect: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.05)
            return
        self._live.add(proto)
        self._feed(proto)

    async def _schedule(self, start: float) -> None:
        """Open loop: release each request at its due time, in bursts of whatever is due every ~1 ms."""
        assert self.rate is not None
        interval = 1.0 / self.rate
        n = len(self.requests)
        res = self.result
        while self._next < n:
            now = time.perf_counter()
            if now >= self._deadline:
                break
            while self._next < n:
                due = start + self._next * interval
                if due > now:
                    break
                if self._idle:
                    self._start(self._idle.popleft(), self._next, due)
                else:
                    self._backlog.append((self._next, due))
                    res.max_backlog = max(res.max_backlog, len(self._backlog))
                self._next += 1
            if self._next < n:
                await asyncio.sleep(max(0.0, min(0.001, start + self._next * interval - time.perf_counter())))
        res.last_due = start + (self._next - 1) * interval
        self._dispatch_done = True
        self._check_done()

    async def run(self) -> Result:
        loop = asyncio.get_running_loop()
        res = self.result
        cpu0 = time.process_time()
        self._all_done = loop.create_future()
        # Connect first, off the clock.
        self._deadline = time.perf_counter() + 30.0
        await asyncio.gather(*(self._connect() for _ in range(self.connections)))
        if not self._live:
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}: {dict(res.errors)}")
        res.started = res.first_due = time.perf_counter()
        self._deadline = res.started + self.max_seconds
        self._running = True
        if self.rate is None:
            for conn in list(self._idle):
                self._idle.remove(conn)
                self._feed(conn)
        else:
            await self._schedule(res.started)
        self._check_done()
        # Wait for the answers still due (bounded), then close.
        try:
            await asyncio.wait_for(
                asyncio.shield(self._all_done), timeout=max(5.0, self._deadline - time.perf_counter() + 5)
            )
        except TimeoutError:
            stuck = self._outstanding + len(self._backlog)
            res.errors["no answer before the deadline"] += stuck
            res.failed += stuck
        res.finished = time.perf_counter()
        self._running = False
        for conn in list(self._live):
            if conn.transport is not None:
                conn.transport.close()
        res.cpu_s = time.process_time() - cpu0
        return res


async def generate(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    connections: int,
    rate: float | None = None,
    max_seconds: float = 60.0,
    on_response: OnResponse | None = None,
) -> Result:
    gen = Generator(
        host, port, requests, connections=connections, rate=rate, max_seconds=max_seconds, on_response=on_response
    )
    return await gen.run()

"""Load and the exactly-once check for the container suite.

Requests go out at a fixed rate (open loop), singles and batches mixed; each one is recorded as ok (202:
its accepted events), failed (a 4xx/5xx answer, or a refused connection: nothing was sent) or unknown (a
timeout, another transport error, or the API's 504). The check then reads Cassandra: every event of an ok
request has one row in ``events_by_id`` and one row with its ``event_id`` in its (listing_id, day) partition
of ``events_by_listing_day`` (the partition is scanned, not point-read), and no event of a failed request is
stored. A refusal is loadtests/workload.py's Failure, so both suites record a request the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit
from uuid import UUID

import orjson
from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent_with_args

from devstack import PROJECT
from loadtests.workload import Failure
from tests.support import booking, view, wait_until

#: Every event of a run is on one of these listings, so each partition holds a few dozen rows to scan.
LISTINGS = 400


@dataclass
class History:
    """Each event's outcome: acknowledged (202), definitely refused (with the answer), or unknown."""

    ok: set[str] = field(default_factory=set)
    failed: dict[str, Failure] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)

    @property
    def sent(self) -> set[str]:
        return self.ok | set(self.failed) | self.unknown


@dataclass
class Load:
    """What a run sent: the history per event, and each event's partition."""

    history: History = field(default_factory=History)
    partitions: dict[str, tuple[int, dt.date]] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    #: Answers that are neither 202 nor a 503 with Retry-After (the API must not answer those under our faults).
    bad_answers: list[str] = field(default_factory=list)
    sent_requests: int = 0
    #: Every answer but a 202, as (when it came, on this machine's monotonic clock; what it was).
    errors: list[tuple[float, str]] = field(default_factory=list)

    def to_json(self) -> str:
        h = self.history
        return json.dumps(
            {
                "ok": sorted(h.ok),
                "unknown": sorted(h.unknown),
                "failed": [asdict(f) for f in h.failed.values()],
                "partitions": {i: [listing, day.isoformat()] for i, (listing, day) in self.partitions.items()},
                "requests": dict(self.requests),
                "bad_answers": self.bad_answers,
                "sent_requests": self.sent_requests,
                "errors": self.errors,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Load:
        data = json.loads(text)
        history = History(ok=set(data["ok"]), unknown=set(data["unknown"]))
        history.failed = {f["event_id"]: Failure(**f) for f in data["failed"]}
        return cls(
            history=history,
            partitions={i: (listing, dt.date.fromisoformat(day)) for i, (listing, day) in data["partitions"].items()},
            requests=Counter(data["requests"]),
            bad_answers=data["bad_answers"],
            sent_requests=data["sent_requests"],
            errors=[(at, what) for at, what in data["errors"]],
        )


#: The load process's first line: its schedule has started.
_STARTED = "started"


class SteadyLoad:
    """Posts fresh events at ``rate`` requests per second, every ``batch_every``-th request a batch.

    The requests go out from a child process (``python -m tests.containers.load``): with a GIL of its own, the
    schedule is not held up by the Cassandra driver's threads of the test, which read and sample meanwhile.
    Entering waits until its schedule has started (the child says so on its first line): on a busy machine
    its imports took seconds, which a test's timeline (so many seconds of load, then a fault) must not lose.
    Closing its stdin stops it; it then waits for the requests in flight and prints what happened as JSON.
    """

    def __init__(self, base_url: str, key: str, rate: float, batch_every: int = 10, batch_size: int = 10) -> None:
        self.args = [base_url, key, str(rate), str(batch_every), str(batch_size)]
        self.load = Load()
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> SteadyLoad:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.containers.load", *self.args],
            cwd=PROJECT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        assert first == f"{_STARTED}\n", f"the load process did not start: {first!r}"
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> Load:
        if self._proc is not None:
            # Not communicate(): the first line was read through the same buffered stdout.
            assert self._proc.stdin is not None
            assert self._proc.stdout is not None
            self._proc.stdin.close()
            with self._proc.stdout:
                out = self._proc.stdout.read()
            self._proc.wait(timeout=60)
            assert self._proc.returncode == 0, f"the load process failed ({self._proc.returncode})"
            self.load = Load.from_json(out)
            self._proc = None
        return self.load


class _Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


class _ConnectFailed(Exception):
    """No connection: the request was never sent."""


class _Connection:
    """One keep-alive HTTP/1.1 connection, by hand: httpx costs several ms of CPU per request, which a starved
    2-core machine cannot give at 200 requests/s; this costs a fraction of one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> _Answer:
        if self.writer is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise _ConnectFailed(repr(exc)) from exc
        assert self.reader is not None
        self.writer.write(head + body)
        status_line, _, rest = (await self.reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        headers = {}
        for line in rest.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        content = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return _Answer(int(status_line.split()[1]), headers, content)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class _Generator:
    """The load itself, in the child process: requests queued on schedule, sent over a pool of connections."""

    CONNECTIONS = 64
    TIMEOUT_S = 5.0

    def __init__(self, base_url: str, key: str, rate: float, batch_every: int, batch_size: int) -> None:
        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.key, self.rate = key, rate
        self.batch_every, self.batch_size = batch_every, batch_size
        self.load = Load()
        self._stop = threading.Event()

    def _event(self, n: int) -> dict[str, Any]:
        # occurred_at a little in the past, on today's partition, so the rows land on many (listing, day) keys.
        at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        listing = 1 + n % LISTINGS
        make = booking if n % 7 == 0 else view
        event = make(listing_id=listing, user_id=1 + n % 1000, occurred_at=at.isoformat(timespec="milliseconds"))
        self.load.partitions[event["event_id"]] = (listing, at.date())
        return event

    async def _run(self) -> None:
        queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue()
        senders = [asyncio.create_task(self._sender(queue)) for _ in range(self.CONNECTIONS)]
        started, sent, made = time.monotonic(), 0, 0
        print(_STARTED, flush=True)
        while not self._stop.is_set():
            # Open loop: requests are due on schedule whether or not earlier ones were answered.
            due = int((time.monotonic() - started) * self.rate)
            while sent < due:
                count = self.batch_size if sent % self.batch_every == 0 else 1
                queue.put_nowait([self._event(made + i) for i in range(count)])
                made += count
                sent += 1
            await asyncio.sleep(0.005)
        self.load.sent_requests = sent
        for _ in senders:
            queue.put_nowait(None)
        await asyncio.gather(*senders)

    async def _sender(self, queue: asyncio.Queue[list[dict[str, Any]] | None]) -> None:
        connection = _Connection(self.host, self.port)
        while (events := await queue.get()) is not None:
            await self._post(connection, events)
        connection.close()

    async def _post(self, connection: _Connection, events: list[dict[str, Any]]) -> None:
        h, ids = self.load.history, [e["event_id"] for e in events]
        path, payload = ("/v1/events", events[0]) if len(events) == 1 else ("/v1/events/batch", {"events": events})
        body = orjson.dumps(payload)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        began = time.monotonic()
        try:
            answer = await asyncio.wait_for(connection.request(head, body), self.TIMEOUT_S)
        except _ConnectFailed:
            for i in ids:
                h.failed[i] = Failure(i, 0, "connect_error", None, time.monotonic() - began, began)
            self.load.requests["connect_error"] += 1
            self.load.errors.append((time.monotonic(), "connect_error"))
            return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
            # Sent, but no whole answer: the request may or may not have taken effect.
            connection.close()
            h.unknown.update(ids)
            self.load.requests[type(exc).__name__] += 1
            self.load.errors.append((time.monotonic(), type(exc).__name__))
            return
        self.load.requests[str(answer.status)] += 1
        if answer.status != 202:
            self.load.errors.append((time.monotonic(), str(answer.status)))
        if answer.status == 202:
            results = orjson.loads(answer.body)["results"]
            for i, result in zip(ids, results, strict=True):
                if result["status"] == "accepted":
                    h.ok.add(i)
                else:
                    h.failed[i] = Failure(i, 202, "rejected", None, time.monotonic() - began, began)
            return
        if answer.status == 504:
            h.unknown.update(ids)
            return
        retry_after = answer.headers.get("retry-after")
        code = orjson.loads(answer.body).get("error", {}).get("code", "") if answer.body else ""
        for i in ids:
            h.failed[i] = Failure(i, answer.status, code, retry_after, time.monotonic() - began, began)
        if not (answer.status == 503 and retry_after):
            self.load.bad_answers.append(f"{answer.status} {code}")


@dataclass
class Rows:
    """Rows found per event: in events_by_id, and in its partition of events_by_listing_day."""

    by_id: Counter[str]
    by_listing: Counter[str]


def read_rows(session: Session, load: Load, ids: set[str], consistency: int = ConsistencyLevel.LOCAL_QUORUM) -> Rows:
    """Count each event's rows in both tables; a failed read raises (it must never pass for "not stored")."""
    by_id_stmt = session.prepare("SELECT event_id FROM events_by_id WHERE event_id = ?")
    by_id_stmt.consistency_level = consistency
    ordered = sorted(ids)
    results = execute_concurrent_with_args(session, by_id_stmt, [(UUID(i),) for i in ordered], concurrency=32)
    by_id: Counter[str] = Counter()
    for i, (_, rows) in zip(ordered, results, strict=True):
        by_id[i] = len(rows.current_rows)
    wanted: dict[tuple[int, dt.date], set[str]] = defaultdict(set)
    for i in ids:
        wanted[load.partitions[i]].add(i)
    scan = session.prepare("SELECT event_id FROM events_by_listing_day WHERE listing_id = ? AND day = ?")
    scan.consistency_level = consistency
    scan.fetch_size = 5000
    keys = sorted(wanted)
    by_listing: Counter[str] = Counter()
    for key, (_, rows) in zip(keys, execute_concurrent_with_args(session, scan, keys, concurrency=16), strict=True):
        for row in rows:  # iterating pages through the whole partition
            if str(row.event_id) in wanted[key]:
                by_listing[str(row.event_id)] += 1
    return Rows(by_id, by_listing)


def check(load: Load, session: Session, settle_s: float = 120) -> dict[str, int]:
    """Every ok event stored once in both tables, no failed event stored; returns the figures."""
    h = load.history
    assert h.ok, f"no request succeeded: {load.requests}"
    missing = set(h.ok)

    def all_ok_stored() -> bool:
        nonlocal missing
        rows = read_rows(session, load, missing)
        missing = {i for i in missing if not (rows.by_id[i] and rows.by_listing[i])}
        return not missing

    wait_until(all_ok_stored, settle_s, "every acknowledged event to be stored (still missing some)", every=2)
    rows = read_rows(session, load, h.sent)
    duplicated = sorted(i for i in h.sent if rows.by_id[i] > 1 or rows.by_listing[i] > 1)
    half = sorted(i for i in h.sent if bool(rows.by_id[i]) != bool(rows.by_listing[i]))
    wrongly = sorted(i for i in h.failed if rows.by_id[i] or rows.by_listing[i])
    assert not duplicated, f"{len(duplicated)} events stored more than once, e.g. {duplicated[:3]}"
    assert not half, f"{len(half)} events in one table only, e.g. {half[:3]}"
    assert not wrongly, f"{len(wrongly)} events refused with an error were stored anyway, e.g. {wrongly[:3]}"
    return {
        "requests": load.sent_requests,
        "events_ok": len(h.ok),
        "events_failed": len(h.failed),
        "events_unknown": len(h.unknown),
        "stored": sum(1 for i in h.sent if rows.by_id[i]),
        "lost": 0,
        "duplicated": 0,
    }


def main(argv: list[str]) -> None:
    base_url, key, rate, batch_every, batch_size = argv
    generator = _Generator(base_url, key, float(rate), int(batch_every), int(batch_size))
    # The parent closes our stdin to stop the load.
    threading.Thread(target=lambda: (sys.stdin.read(), generator._stop.set()), daemon=True).start()
    asyncio.run(generator._run())
    print(generator.load.to_json())


if __name__ == "__main__":
    main(sys.argv[1:])

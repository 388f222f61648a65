"""A Jepsen-style history for fault tests: steady load, every request recorded as ok, failed or unknown,
and a checker run once the system has settled."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from uuid import UUID

import httpx
from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent_with_args

from tests.support import AUTH, booking, view, wait_until


@dataclass
class Failure:
    event_id: str
    status: int
    code: str
    retry_after: str | None
    seconds: float
    sent_at: float


@dataclass
class History:
    ok: set[str] = field(default_factory=set)
    failed: dict[str, Failure] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def sent(self) -> set[str]:
        return self.ok | set(self.failed) | self.unknown


class SteadyLoad:
    """Posts fresh events at ``rate`` per second from a background thread until stopped.

    202 is ok; a 4xx/5xx answer is failed; a refused connection is failed (nothing was sent); any other
    transport error, a timeout, or the API's 504 is unknown: the request may or may not have taken effect.
    """

    def __init__(self, base_url: str, rate: float = 100, timeout: float = 3.0) -> None:
        self.base_url = base_url
        self.rate = rate
        self.timeout = timeout
        self.history = History()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="steady-load", daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> History:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 10)
        return self.history

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.base_url, headers=AUTH, timeout=self.timeout, limits=limits) as c:
            pending: set[asyncio.Task[None]] = set()
            started = time.monotonic()
            sent = 0
            while not self._stop.is_set():
                # Open loop: requests go out on schedule whether or not earlier ones were answered.
                due = int((time.monotonic() - started) * self.rate)
                while sent < due and len(pending) < 500:
                    event = booking() if sent % 10 == 0 else view(listing_id=1 + sent % 97)
                    task = asyncio.create_task(self._post(c, event["event_id"], event))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    sent += 1
                await asyncio.sleep(0.005)
            if pending:
                await asyncio.wait(pending)

    async def _post(self, client: httpx.AsyncClient, event_id: str, event: dict[str, object]) -> None:
        began = time.monotonic()
        try:
            response = await client.post("/v1/events", json=event)
        except httpx.ConnectError:
            self.history.failed[event_id] = Failure(event_id, 0, "connect_error", None, time.monotonic() - began, began)
            self.history.outcomes["connect_error"] += 1
            return
        except httpx.HTTPError as exc:
            self.history.unknown.add(event_id)
            self.history.outcomes[type(exc).__name__] += 1
            return
        if response.status_code == 202:
            self.history.ok.add(event_id)
            self.history.outcomes["202"] += 1
            return
        if response.status_code == 504:  # the API's own "outcome unknown" (Redis did not confirm in time)
            self.history.unknown.add(event_id)
            self.history.outcomes["504"] += 1
            return
        code = response.json().get("error", {}).get("code", "") if response.content else ""
        self.history.failed[event_id] = Failure(
            event_id, response.status_code, code, response.headers.get("retry-after"), time.monotonic() - began, began
        )
        self.history.outcomes[str(response.status_code)] += 1


def stored_ids(session: Session, ids: set[str]) -> dict[str, tuple[int, int]]:
    """For each id that is stored at all: its row count in (events_by_id, events_by_listing_day)."""
    by_id = session.prepare("SELECT listing_id, day, occurred_at FROM events_by_id WHERE event_id = ?")
    by_listing = session.prepare(
        "SELECT event_id FROM events_by_listing_day"
        " WHERE listing_id = ? AND day = ? AND occurred_at = ? AND event_id = ?"
    )
    ordered = sorted(ids)
    # A failed read raises: it must never pass for "not stored".
    first = execute_concurrent_with_args(session, by_id, [(UUID(i),) for i in ordered], concurrency=16)
    found = {i: rows.one() for i, (_, rows) in zip(ordered, first, strict=True) if rows.current_rows}
    keys = sorted(found)
    params = [(found[i].listing_id, found[i].day, found[i].occurred_at, UUID(i)) for i in keys]
    second = execute_concurrent_with_args(session, by_listing, params, concurrency=16)
    return {i: (1, len(rows.current_rows)) for i, (_, rows) in zip(keys, second, strict=True)}


def check(history: History, session: Session, settle_s: float = 90) -> dict[str, int]:
    """Every ok event is stored, in both tables, once; every stored event was ok or unknown."""
    assert history.ok, f"no request succeeded: {history.outcomes}"
    missing: set[str] = set(history.ok)

    def all_ok_stored() -> bool:
        nonlocal missing
        missing = missing - set(stored_ids(session, missing))
        return not missing

    wait_until(all_ok_stored, settle_s, f"every acknowledged event to be stored ({len(missing)} missing)", every=1)
    stored = stored_ids(session, history.sent)
    assert all(rows == (1, 1) for rows in stored.values()), "an event is stored more than once or half-written"
    wrongly_stored = set(stored) - history.ok - history.unknown
    assert not wrongly_stored, f"{len(wrongly_stored)} events refused with an error were stored anyway"
    return {
        "ok": len(history.ok),
        "failed": len(history.failed),
        "unknown": len(history.unknown),
        "stored": len(stored),
    }

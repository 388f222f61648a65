"""Pieces of the benchmark: prebuilt request bodies, CPU accounting per role, the end-to-end lag poller."""

from __future__ import annotations

import base64
import datetime as dt
import math
import queue
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import orjson

from loadtests.common import Zipf, make_event, percentile
from loadtests.loadgen import http_request
from loadtests.procs import StackProcesses, machine_cpu
from loadtests.verify import CHUNK, Accepted, Checker


class EventFactory:
    """Request bytes built before the clock starts, and what the exactly-once check needs for each event.

    Each phase gets listings of its own (``base`` + phase * 10**6 + Zipf rank over ``listings``), so checking
    one phase never reads the partitions of another.
    """

    def __init__(self, host: str, port: int, api_key: str, listings: int, seed: int | None = None) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.rng = random.Random(seed)
        self.base = (int(time.time()) % 100_000) * 10**7
        self.listings = listings
        self.phase = 0

    def _zipf(self) -> Zipf:
        self.phase += 1
        return Zipf(self.listings, base=self.base + self.phase * 10**6, rng=self.rng)

    def _event(self, zipf: Zipf, epoch_ms: int) -> tuple[dict[str, Any], Accepted]:
        eid = uuid.UUID(int=self.rng.getrandbits(128), version=4)
        kind = "booking" if self.rng.random() < 0.1 else "view"
        listing = zipf.listing()
        event = make_event(str(eid), kind, listing, self.rng.randint(1, 2_000_000), epoch_ms, self.rng)
        return event, Accepted.of(event)

    def single(self, count: int, rate: float) -> tuple[list[bytes], list[Accepted]]:
        """``count`` POST /v1/events, ``occurred_at`` at each request's due time from about now."""
        zipf = self._zipf()
        start_ms = int(time.time() * 1000) + 500
        requests: list[bytes] = []
        records: list[Accepted] = []
        for i in range(count):
            event, rec = self._event(zipf, start_ms + int(i * 1000 / rate))
            requests.append(http_request("POST", "/v1/events", self.host, self.port, self.api_key, orjson.dumps(event)))
            records.append(rec)
        return requests, records

    def batches(self, count: int, size: int) -> tuple[list[bytes], list[list[Accepted]]]:
        """``count`` POST /v1/events/batch of ``size`` events each."""
        zipf = self._zipf()
        now_ms = int(time.time() * 1000)
        requests: list[bytes] = []
        records: list[list[Accepted]] = []
        for _ in range(count):
            pairs = [self._event(zipf, now_ms - self.rng.randint(0, 2000)) for _ in range(size)]
            body = orjson.dumps({"events": [event for event, _ in pairs]})
            requests.append(http_request("POST", "/v1/events/batch", self.host, self.port, self.api_key, body))
            records.append([rec for _, rec in pairs])
        return requests, records

    def sdk_batches(self, count: int, size: int) -> tuple[list[bytes], list[list[Accepted]]]:
        """``count`` POST /v1/batch of ``size`` Segment ``track`` messages each, as analytics-python 2.4 sends
        them (its message fields and context, ``sentAt`` and ``writeKey`` in the body, Basic auth with the key
        as user name, no gzip: its default); the records are the events Sluice should store."""
        zipf = self._zipf()
        now_ms = int(time.time() * 1000)
        basic = "Basic " + base64.b64encode(f"{self.api_key}:".encode()).decode()
        requests: list[bytes] = []
        records: list[list[Accepted]] = []
        for _ in range(count):
            pairs = [self._event(zipf, now_ms - self.rng.randint(0, 2000)) for _ in range(size)]
            sent_at = dt.datetime.now(dt.UTC).isoformat()
            body = {"batch": [_segment_track(event) for event, _ in pairs], "sentAt": sent_at, "writeKey": self.api_key}
            requests.append(http_request("POST", "/v1/batch", self.host, self.port, self.api_key, orjson.dumps(body),
                                         authorization=basic))  # fmt: skip
            records.append([rec for _, rec in pairs])
        return requests, records


_LIBRARY = {"library": {"name": "analytics-python", "version": "2.4.0"}}
_SDK_NAMES = {"view": "Listing Viewed", "booking": "Booking Completed"}


def _segment_track(event: dict[str, Any]) -> dict[str, Any]:
    """A native event as analytics-python's ``track`` makes the message (a price as the float it turns a
    Decimal into; the timestamp in UTC, milliseconds)."""
    props = {k: v for k, v in event.items() if k not in ("event_id", "type", "user_id", "occurred_at")}
    if "total_price" in props:
        props["total_price"] = float(props["total_price"])
    occurred = dt.datetime.fromisoformat(event["occurred_at"]).astimezone(dt.UTC)
    return {"integrations": {}, "anonymousId": None, "properties": props,
            "timestamp": occurred.isoformat(timespec="milliseconds"), "context": _LIBRARY,
            "userId": str(event["user_id"]), "type": "track", "event": _SDK_NAMES[event["type"]],
            "messageId": event["event_id"]}  # fmt: skip


@dataclass
class Usage:
    """CPU used during one phase: cores busy per role, the machine, and this process (the load generator)."""

    wall_s: float
    cores: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 2), "cores": {k: round(v, 2) for k, v in self.cores.items()}}


class Meter:
    def __init__(self, procs: StackProcesses) -> None:
        self.procs = procs
        self._start: tuple[float, float, float, dict[str, float]] = (0.0, 0.0, 0.0, {})

    def start(self) -> None:
        busy, _ = machine_cpu()
        self._start = (time.monotonic(), busy, time.process_time(), self.procs.cpu_by_role())

    def stop(self) -> Usage:
        wall0, busy0, own0, roles0 = self._start
        wall = max(1e-9, time.monotonic() - wall0)
        busy, _ = machine_cpu()
        roles = self.procs.cpu_by_role()
        cores = {role: max(0.0, roles[role] - roles0.get(role, 0.0)) / wall for role in roles}
        cores["bench (load generator + checks)"] = (time.process_time() - own0) / wall
        cores["machine (all processes)"] = (busy - busy0) / wall
        return Usage(wall, cores)


@dataclass
class LagPoller:
    """Polls ``events_by_id`` for sampled events until each is readable; lag = readable - 202 received.

    Runs in a thread (the driver does its I/O in its own thread), fed by the load generator's callback with
    ``(event_id, perf_counter at the 202)``. A poll's time is the midpoint of its round trip, so a lag is
    exact to within half a round trip plus ``every``.
    """

    checker: Checker
    every: float = 0.01
    inbox: queue.SimpleQueue[tuple[UUID, float]] = field(default_factory=queue.SimpleQueue)
    lags_ms: list[float] = field(default_factory=list)
    outstanding: dict[UUID, float] = field(default_factory=dict)
    polls: int = 0
    _stop_at: float = math.inf
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lag-poller", daemon=True)
        self._thread.start()

    def finish(self, timeout: float) -> None:
        """Stop once every sample is found, or after ``timeout`` seconds."""
        self._stop_at = time.perf_counter() + timeout
        if self._thread is not None:
            self._thread.join(timeout + 5)

    def _run(self) -> None:
        session = self.checker.session
        statement = self.checker.by_id
        while True:
            while True:
                try:
                    event_id, accepted = self.inbox.get_nowait()
                except queue.Empty:
                    break
                self.outstanding[event_id] = accepted
            now = time.perf_counter()
            if not self.outstanding:
                if now >= self._stop_at:
                    return
                time.sleep(self.every)
                continue
            if now >= self._stop_at:
                return
            ids = list(self.outstanding)
            for start in range(0, len(ids), CHUNK):
                sent = time.perf_counter()
                rows = session.execute(statement, (ids[start : start + CHUNK],))
                seen = (sent + time.perf_counter()) / 2
                self.polls += 1
                for row in rows:
                    if row.event_id in self.outstanding:
                        accepted = self.outstanding.pop(row.event_id)
                        self.lags_ms.append(max(0.0, seen - accepted) * 1000)
            time.sleep(self.every)

    def summary(self) -> dict[str, Any]:
        lags = sorted(self.lags_ms)
        return {
            "samples": len(lags),
            "not_found": len(self.outstanding),
            "p50_ms": round(percentile(lags, 0.5), 1),
            "p90_ms": round(percentile(lags, 0.9), 1),
            "p99_ms": round(percentile(lags, 0.99), 1),
            "max_ms": round(lags[-1], 1) if lags else math.nan,
            "polls": self.polls,
        }


def ok_records(statuses: Sequence[int], records: Sequence[Accepted], ok: int = 202) -> list[Accepted]:
    return [rec for status, rec in zip(statuses, records, strict=True) if status == ok]

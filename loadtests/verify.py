"""After the load: wait for the queue to drain, then check in Cassandra that each accepted event is stored once.

An event is *stored exactly once* when ``events_by_id`` has its row and its ``(listing_id, day)`` partition of
``events_by_listing_day`` holds exactly one row with its ``event_id`` (the check of ``tests/support.py``
``stored_rows``), done in bulk: prepared ``IN ?`` queries run with ``execute_concurrent_with_args``, one query
per chunk of ids, and one per chunk of listings of the same day (partitions are read only within the run's
time window, so rows of earlier runs in the same partitions are not read again).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import redis
from cassandra.cluster import Cluster, Session
from cassandra.concurrent import execute_concurrent_with_args

from loadtests.common import accepted_line, say
from sluice import keys

#: Ids per ``IN`` query: large enough to amortise round trips, small enough for the coordinator.
CHUNK = 100
#: Partition reads cover the run's occurred_at span plus this margin on each side.
WINDOW_MARGIN = dt.timedelta(seconds=120)


@dataclass(frozen=True, slots=True)
class Accepted:
    """An event the API acknowledged (202): what is needed to find both of its rows."""

    event_id: UUID
    listing_id: int
    epoch_ms: int

    @property
    def day(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.epoch_ms / 1000, dt.UTC).date()

    @property
    def occurred_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.epoch_ms / 1000, dt.UTC)

    def csv(self) -> str:
        return accepted_line(str(self.event_id), self.listing_id, self.epoch_ms)

    @classmethod
    def parse(cls, line: str) -> Accepted:
        event_id, listing_id, epoch_ms = line.strip().split(",")
        return cls(UUID(event_id), int(listing_id), int(epoch_ms))


def read_accepted(paths: Iterable[Path]) -> list[Accepted]:
    out: list[Accepted] = []
    for path in paths:
        with path.open() as f:
            out += [Accepted.parse(line) for line in f if line.strip()]
    return out


@dataclass
class CheckResult:
    total: int = 0
    stored_once: int = 0
    #: Not readable by id, or missing from its listing's partition.
    lost: list[UUID] = field(default_factory=list)
    #: More than one row in its listing's partition.
    duplicated: list[UUID] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self, sample: int = 20) -> dict[str, Any]:
        return {
            "checked": self.total,
            "stored_once": self.stored_once,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "lost_sample": [str(u) for u in self.lost[:sample]],
            "duplicated_sample": [str(u) for u in self.duplicated[:sample]],
            "check_seconds": round(self.seconds, 2),
        }


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Checker:
    """A Cassandra session with the look-ups prepared once."""

    def __init__(self, port: int = 9042, keyspace: str = "sluice", concurrency: int = 32) -> None:
        self.cluster = Cluster(["127.0.0.1"], port=port, connect_timeout=5, control_connection_timeout=5)
        self.session: Session = self.cluster.connect(keyspace)
        self.concurrency = concurrency
        self.by_id = self.session.prepare("SELECT event_id FROM events_by_id WHERE event_id IN ?")
        self.by_listing = self.session.prepare(
            "SELECT event_id FROM events_by_listing_day WHERE listing_id IN ? AND day = ?"
            " AND occurred_at >= ? AND occurred_at <= ?"
        )

    def close(self) -> None:
        self.cluster.shutdown()

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self, statement: Any, params: list[tuple[Any, ...]]) -> list[Any]:
        rows: list[Any] = []
        if not params:
            return rows
        for ok, result in execute_concurrent_with_args(
            self.session, statement, params, concurrency=self.concurrency, raise_on_first_error=True
        ):
            assert ok
            rows += list(result)  # iterating fetches further pages, if any
        return rows

    def present_by_id(self, ids: Sequence[UUID]) -> set[UUID]:
        rows = self._run(self.by_id, [(list(chunk),) for chunk in _chunks(ids, CHUNK)])
        return {row.event_id for row in rows}

    def listing_counts(self, records: Sequence[Accepted]) -> Counter[UUID]:
        """How many rows each of our event ids has in the listing-day partitions our events went to."""
        by_day: dict[dt.date, list[Accepted]] = defaultdict(list)
        for rec in records:
            by_day[rec.day].append(rec)
        params: list[tuple[Any, ...]] = []
        for day, recs in by_day.items():
            lo = min(r.epoch_ms for r in recs)
            hi = max(r.epoch_ms for r in recs)
            start = dt.datetime.fromtimestamp(lo / 1000, dt.UTC) - WINDOW_MARGIN
            end = dt.datetime.fromtimestamp(hi / 1000, dt.UTC) + WINDOW_MARGIN
            listings = sorted({r.listing_id for r in recs})
            params += [(list(chunk), day, start, end) for chunk in _chunks(listings, CHUNK)]
        return Counter(row.event_id for row in self._run(self.by_listing, params))

    def check(self, records: Sequence[Accepted]) -> CheckResult:
        started = time.monotonic()
        ids = [r.event_id for r in records]
        present = self.present_by_id(ids)
        counts = self.listing_counts(records)
        result = CheckResult(total=len(records))
        for rec in records:
            n = counts.get(rec.event_id, 0)
            if rec.event_id not in present or n == 0:
                result.lost.append(rec.event_id)
            elif n > 1:
                result.duplicated.append(rec.event_id)
            else:
                result.stored_once += 1
        result.seconds = time.monotonic() - started
        return result

    def wait_stored(self, records: Sequence[Accepted], timeout: float, every: float = 1.0) -> int:
        """Poll ``events_by_id`` until every record is readable or ``timeout``; returns how many are missing."""
        missing = [r.event_id for r in records]
        deadline = time.monotonic() + timeout
        while missing:
            present = self.present_by_id(missing)
            missing = [i for i in missing if i not in present]
            if not missing or time.monotonic() >= deadline:
                break
            say(f"  {len(missing)} accepted events not readable yet; waiting")
            time.sleep(every)
        return len(missing)


def queue_depth(client: redis.Redis) -> tuple[int, int]:
    """(messages waiting in the events queue, messages delivered but not yet acknowledged)."""
    pipe = client.pipeline(transaction=False)
    pipe.llen(keys.EVENTS_QUEUE)
    pipe.hlen(keys.UNACKED)
    waiting, unacked = pipe.execute()
    return int(waiting), int(unacked)


def wait_drained(
    client: redis.Redis,
    timeout: float,
    *,
    every: float = 0.25,
    note_every: float = 5.0,
    note: Callable[[str], None] = say,
) -> float | None:
    """Wait until the queue is empty and nothing is unacknowledged; the seconds it took, or None on timeout."""
    started = time.monotonic()
    next_note = started + note_every
    while True:
        waiting, unacked = queue_depth(client)
        now = time.monotonic()
        if waiting == 0 and unacked == 0:
            return now - started
        if now - started >= timeout:
            note(f"  queue not drained after {timeout:.0f} s: {waiting} messages waiting, {unacked} unacknowledged")
            return None
        if now >= next_note:
            note(f"  draining: {waiting} messages waiting, {unacked} being written ({now - started:.0f} s)")
            next_note = now + note_every
        time.sleep(every)


def dead_letters(client: redis.Redis) -> int:
    return int(cast(int, client.hlen(keys.DEAD_LETTERS)))

"""After the load: wait for the queue to drain, then check in Cassandra that each accepted event is stored once.

The check is :mod:`loadtests.checker` (the same one the fault tests and the chaos run use): every accepted
event read by id and found by scanning its listing's day partitions over the run's time window, every field
compared with what was sent, and any row of those partitions that the run never had accepted flagged.
Records are :class:`~loadtests.checker.Expected` (one accepted event, as sent); the load test reads them from
the JSON lines its locust processes write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import cast

import orjson
import redis

from loadtests.checker import CHUNK, WINDOW_MARGIN, Expected, Ledger, Report
from loadtests.checker import Checker as _Checker
from loadtests.common import say
from sluice import keys

__all__ = [
    "CHUNK", "WINDOW_MARGIN", "Accepted", "CheckResult", "Checker", "dead_letters", "queue_depth", "read_accepted",
    "wait_drained",
]  # fmt: skip

#: An accepted event, as sent (normalised to its stored form).
Accepted = Expected
#: The checker's report; ``as_json`` keeps the keys the load test and the bench always wrote.
CheckResult = Report


def read_accepted(paths: Iterable[Path]) -> list[Accepted]:
    out: list[Accepted] = []
    for path in paths:
        with path.open("rb") as f:
            out += [Expected.of(orjson.loads(line)) for line in f if line.strip()]
    return out


class Checker(_Checker):
    """The exactly-once checker over a plain list of accepted events (every one of them must be stored)."""

    def check_accepted(self, records: Sequence[Accepted]) -> CheckResult:
        ledger = Ledger()
        for record in records:
            ledger.record(record, "accepted")
        return super().check(ledger)

    def wait_stored_records(self, records: Sequence[Accepted], timeout: float, every: float = 1.0) -> int:
        """Poll ``events_by_id`` until every record is readable or ``timeout``; returns how many are missing."""
        started = time.monotonic()
        missing = self.wait_stored([r.event_id for r in records], timeout, every, note=say)
        if missing:
            say(f"  {missing} accepted events still not readable after {time.monotonic() - started:.0f} s")
        return missing


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

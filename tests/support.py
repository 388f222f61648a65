"""Helpers for tests on the real stack: the test settings of service processes (started by the launcher,
devstack/services.py), event factories, and Cassandra look-ups."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import redis
from cassandra.cluster import Session
from cassandra.query import ValueSequence

from devstack import Profile, services
from devstack.services import Service as Service  # re-exported: the tests' type of a service


def view(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "type": "view",
        "listing_id": 42,
        "user_id": 7,
        "occurred_at": "2026-11-25T09:30:00.250+01:00",
    }
    return event | overrides


def booking(**overrides: Any) -> dict[str, Any]:
    event = view(type="booking") | {
        "check_in": "2026-12-01",
        "check_out": "2026-12-04",
        "guests": 2,
        "total_price": "449.70",
        "currency": "EUR",
    }
    return event | overrides


def flushed_db(profile: Profile, db: int) -> Iterator[redis.Redis]:
    """A client of one database of the test Redis, emptied before and after the test (for a fixture to
    ``yield from``)."""
    client = redis.Redis(port=profile.redis_port, db=db)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


#: The API key of test runs (never a real secret).
TEST_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}

#: Shorter than the defaults so fault tests settle in seconds: a lost message is handed out again after
#: 20 s instead of 5 minutes, and retries back off from 0.5 s up to 4 s.
TEST_TIMINGS = {
    "SLUICE_VISIBILITY_TIMEOUT_S": "20",
    "SLUICE_TASK_TIME_LIMIT_S": "15",
    "SLUICE_TASK_RETRY_BACKOFF_S": "0.5",
    "SLUICE_TASK_RETRY_BACKOFF_MAX_S": "4",
}


def service_env(profile: Profile, **extra: str) -> dict[str, str]:
    return (
        profile.service_env()
        | TEST_TIMINGS
        | {
            "SLUICE_API_PORT": str(profile.api_port),
            "SLUICE_LOG_LEVEL": "INFO",
            "SLUICE_API_KEYS": TEST_KEY,
            # One directory for the whole test stack: the API's /metrics then shows every process.
            "PROMETHEUS_MULTIPROC_DIR": str(profile.root / "metrics"),
        }
        | extra
    )


def start_api(profile: Profile, log_dir: Path, name: str = "api", **env: str) -> Service:
    """The API through the launcher, with the test settings; raises StackError (with its log) if it exits."""
    port = int(env.get("SLUICE_API_PORT", profile.api_port))
    return services.start_api(name, service_env(profile, **env), log_dir, port=port, timeout=30)


def start_worker(
    profile: Profile, log_dir: Path, name: str = "worker", args: Iterable[str] = (), **env: str
) -> Service:
    return services.start_worker(name, service_env(profile, **env), log_dir, args=args, timeout=60)


def utc(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC)


def stored_rows(session: Session, event_id: str | UUID) -> tuple[int, int]:
    """How many rows hold this event in each table: (by id, by listing and day).

    The second number counts the event's rows in its listing's partitions of the day ``events_by_id`` names
    and the days either side, scanned whole: a second row under another ``occurred_at`` (even across
    midnight) counts, so a duplicate shows as 2, not as a point read's 0 or 1.
    """
    eid = UUID(str(event_id))
    by_id = session.execute("SELECT listing_id, day FROM events_by_id WHERE event_id = %s", (eid,)).all()
    if not by_id:
        return 0, 0
    listing_id, day = by_id[0].listing_id, by_id[0].day.date()
    days = [day + dt.timedelta(days=d) for d in (-1, 0, 1)]
    by_listing = session.execute(
        "SELECT event_id FROM events_by_listing_day WHERE listing_id = %s AND day IN %s",
        (listing_id, ValueSequence(days)),
    ).all()
    return len(by_id), sum(1 for row in by_listing if row.event_id == eid)

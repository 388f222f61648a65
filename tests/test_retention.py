"""Retention (SLUICE_RETENTION_DAYS): an event is kept that long after its event time, then expires.

Every cell's write timestamp is the event's time (sluice.cassandra.write_timestamp_us), so a late event's
cells land in an old TWCS window; its TTL counts from the same event time, so it expires with that window
(docs/retention.md). These tests run an API and a worker with a retention of one day on a Redis database
of their own, so the suite's worker (which keeps events forever) never stores their events.
"""

from __future__ import annotations

import datetime as dt
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cassandra.cluster import Session

from devstack import Profile
from sluice.cassandra import (
    GC_GRACE_DEFAULT_S,
    GC_GRACE_WITH_RETENTION_S,
    Store,
    apply_retention,
    apply_schema,
    table_options,
    ttl_s,
    twcs_window,
)
from sluice.events import EVENT_ADAPTER, queued_form
from sluice.settings import Settings
from tests.support import AUTH, Service, start_api, start_worker, stored_rows, view, wait_until
from worker.writer import EventWriter, parse_queued

DB = 13
DAY_S = 86_400
#: How long before its expiry the test event is posted: time for the worker to store it and for the test to
#: read it back every way, on a busy machine.
MARGIN_S = 10


def iso_ms(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the arithmetic --------------------------------------------------------------------------------------


def test_the_ttl_counts_from_the_event_time_not_from_the_write() -> None:
    now_us = 1_800_000_000 * 1_000_000
    ten_days = 10 * DAY_S
    # An event that just happened lives the whole retention; one 3 days late lives 3 days less.
    assert ttl_s(now_us, ten_days, now_us) == ten_days
    assert ttl_s(now_us - 3 * DAY_S * 1_000_000, ten_days, now_us) == 7 * DAY_S
    # Rounded up (never expires early); at least one second once past (0 would mean no TTL at all).
    assert ttl_s(now_us - 1, ten_days, now_us) == ten_days
    assert ttl_s(now_us - ten_days * 1_000_000 - 5_000_000, ten_days, now_us) == 1
    # No retention: no TTL.
    assert ttl_s(now_us - 50 * DAY_S * 1_000_000, 0, now_us) == 0


def test_compaction_windows_are_about_a_thirtieth_of_the_retention() -> None:
    assert twcs_window(0) == ("DAYS", 1)  # kept forever: the windows the table had before retention
    assert twcs_window(1) == ("MINUTES", 48)
    assert twcs_window(7) == ("HOURS", 6)
    assert twcs_window(30) == ("DAYS", 1)
    assert twcs_window(365) == ("DAYS", 12)
    for days in (1, 2, 7, 30, 90, 365, 3650):
        unit, size = twcs_window(days)
        window_s = size * {"MINUTES": 60, "HOURS": 3600, "DAYS": DAY_S}[unit]
        assert 20 <= days * DAY_S / window_s <= 50, (days, unit, size)


def test_the_tables_options_follow_the_setting(cassandra: Session, settings: Settings) -> None:
    keyspace = f"ret_{uuid.uuid4().hex[:12]}"
    try:
        apply_schema(cassandra, settings.model_copy(update={"cassandra_keyspace": keyspace, "retention_days": 30}))
        for table in ("events_by_id", "events_by_listing_day"):
            options = cassandra.execute(
                "SELECT default_time_to_live, gc_grace_seconds, compaction FROM system_schema.tables"
                " WHERE keyspace_name = %s AND table_name = %s",
                (keyspace, table),
            ).one()
            assert options.default_time_to_live == 30 * DAY_S
            assert options.gc_grace_seconds == GC_GRACE_WITH_RETENTION_S
            assert options.compaction["class"].endswith("TimeWindowCompactionStrategy")
            assert (options.compaction["compaction_window_unit"], options.compaction["compaction_window_size"]) == (
                "DAYS",
                "1",
            )
        assert apply_retention(cassandra, keyspace, 30) == [], "options already set: nothing to alter"
        # Back to keeping events forever: no default TTL, the default grace, by-id leaves TWCS.
        assert sorted(apply_retention(cassandra, keyspace, 0)) == ["events_by_id", "events_by_listing_day"]
        by_id = cassandra.execute(
            "SELECT default_time_to_live, gc_grace_seconds, compaction FROM system_schema.tables"
            " WHERE keyspace_name = %s AND table_name = 'events_by_id'",
            (keyspace,),
        ).one()
        assert (by_id.default_time_to_live, by_id.gc_grace_seconds) == (0, GC_GRACE_DEFAULT_S)
        assert by_id.compaction["class"].endswith("SizeTieredCompactionStrategy")
        assert table_options(0)["events_by_listing_day"]["compaction"]["compaction_window_unit"] == "DAYS"
    finally:
        cassandra.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


# --- on the real stack -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retention_api(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    env = {"SLUICE_REDIS_URL": f"redis://127.0.0.1:{profile.redis_port}/{DB}", "SLUICE_RETENTION_DAYS": "1"}
    api = start_api(profile, log_dir, name="api-retention", SLUICE_API_PORT=str(profile.api_port + 30), **env)
    worker = start_worker(profile, log_dir, name="worker-retention", **env)
    yield api
    worker.stop()
    api.stop()


@pytest.fixture
def rclient(retention_api: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=retention_api.base_url, headers=AUTH, timeout=10) as c:
        yield c


def test_an_event_older_than_the_retention_is_refused(rclient: httpx.Client) -> None:
    too_old = view(occurred_at=iso_ms(dt.datetime.now(dt.UTC) - dt.timedelta(days=1, seconds=1)))
    answer = rclient.post("/v1/events", json=too_old)
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["error"]["details"]
    assert error["loc"] == ["occurred_at"]
    assert "must be within the retention of 1 day (SLUICE_RETENTION_DAYS)" in error["msg"]
    # In a batch, only that event is refused.
    fresh = view(occurred_at=iso_ms(dt.datetime.now(dt.UTC) - dt.timedelta(hours=23)))
    batch = rclient.post("/v1/events/batch", json={"events": [too_old, fresh]}).json()
    assert [r["status"] for r in batch["results"]] == ["rejected", "accepted"]


def test_a_late_event_is_readable_until_its_event_time_plus_the_retention_then_gone(
    rclient: httpx.Client, cassandra: Session
) -> None:
    listing_id = random.randint(10**9, 10**12)
    occurred = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1) + dt.timedelta(seconds=MARGIN_S)
    expires = occurred + dt.timedelta(days=1)
    event = view(listing_id=listing_id, occurred_at=iso_ms(occurred))
    answer = rclient.post("/v1/events", json=event)
    assert answer.status_code == 202, answer.text

    def location() -> dict[str, Any]:
        reply = rclient.get(f"/v1/events/{event['event_id']}")
        return {"status": "not_found"} if reply.status_code == 404 else reply.json()  # type: ignore[no-any-return]

    wait_until(lambda: location()["status"] == "stored", MARGIN_S - 3, "the late event to be stored")
    window = {"from": iso_ms(occurred - dt.timedelta(minutes=1)), "to": iso_ms(dt.datetime.now(dt.UTC))}
    day = {"from": occurred.date().isoformat(), "to": occurred.date().isoformat()}

    def listed() -> list[str]:
        page = rclient.get(f"/v1/listings/{listing_id}/events", params=window)
        assert page.status_code == 200, page.text
        return [e["event_id"] for e in page.json()["events"]]

    def counted() -> int:
        return int(rclient.get(f"/v1/listings/{listing_id}/stats", params=day).json()["views"])

    assert dt.datetime.now(dt.UTC) < expires - dt.timedelta(seconds=1), "stored too late to check it is readable"
    assert listed() == [event["event_id"]]
    assert counted() == 1
    assert stored_rows(cassandra, event["event_id"]) == (1, 1)
    # Both the write timestamp and the expiry are the event's time (plus the retention), in both tables.
    for table, where in (
        ("events_by_id", "event_id = %s"),
        ("events_by_listing_day", "listing_id = %s AND day = %s AND occurred_at = %s AND event_id = %s"),
    ):
        key = (uuid.UUID(event["event_id"]),) if table == "events_by_id" else (
            listing_id, occurred.date(), occurred, uuid.UUID(event["event_id"]))  # fmt: skip
        row = cassandra.execute(
            f"SELECT writetime(user_id) AS written, ttl(user_id) AS ttl FROM {table} WHERE {where}", key
        ).one()
        assert row.written == int(occurred.timestamp() * 1_000_000), table
        expiry = time.time() + row.ttl
        assert abs(expiry - expires.timestamp()) <= 2, (table, row.ttl)

    # Gone on time: by id, by listing, out of the stats, from both tables.
    wait_until(lambda: location()["status"] == "not_found", (expires - dt.datetime.now(dt.UTC)).total_seconds() + 3,
               "the event to expire", every=0.25)  # fmt: skip
    late_by = (dt.datetime.now(dt.UTC) - expires).total_seconds()
    assert late_by <= 3, f"expired {late_by:.1f} s after its event time plus the retention"
    assert listed() == []
    assert counted() == 0
    assert stored_rows(cassandra, event["event_id"]) == (0, 0)


def test_an_event_written_after_its_expiry_lives_one_second(cassandra: Session) -> None:
    """Accepted just inside the retention but written after it ran out (a slow queue, retries): the TTL is
    clamped to one second rather than 0, which would mean *never* expire."""
    store = Store(cassandra.cluster, cassandra, cassandra.keyspace, retention_days=1)
    occurred = dt.datetime.now(dt.UTC) - dt.timedelta(days=1, seconds=30)
    model = EVENT_ADAPTER.validate_python(view(listing_id=random.randint(10**9, 10**12), occurred_at=iso_ms(occurred)))
    row = parse_queued(queued_form(model))
    assert row is not None
    outcome = EventWriter(store, concurrency=4).write([row], dt.datetime.now(dt.UTC))
    assert [r.event_id for r in outcome.stored] == [row.event_id]
    wait_until(lambda: stored_rows(cassandra, row.event_id) == (0, 0), 4, "the expired event to be gone")

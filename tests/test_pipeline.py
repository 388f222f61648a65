"""End to end on the real servers: HTTP -> Celery on Redis -> worker -> Cassandra -> HTTP."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from uuid import UUID

import httpx
import redis
from cassandra.cluster import Session

from devstack import Profile, Servers
from sluice import keys
from sluice.events import EVENT_ADAPTER, queued_form
from sluice.marks import mark_value
from sluice.queue import WRITE_EVENTS, make_celery
from sluice.settings import Settings
from tests.support import AUTH, Service, booking, start_worker, stored_rows, utc, view, wait_until


def count_stored(session: Session, event_ids: list[str]) -> int:
    return sum(stored_rows(session, eid)[0] for eid in event_ids)


def test_thousand_events_are_stored_exactly_once(
    client: httpx.Client, worker: Service, cassandra: Session, profile: Profile
) -> None:
    events = [booking() if i % 10 == 0 else view(listing_id=1 + i % 37) for i in range(1000)]

    async def post_all() -> list[int]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=str(client.base_url), limits=limits, timeout=10, headers=AUTH) as ac:
            singles = [ac.post("/v1/events", json=e) for e in events[:500]]
            batches = [ac.post("/v1/events/batch", json={"events": events[i : i + 100]}) for i in range(500, 1000, 100)]
            responses = await asyncio.gather(*singles, *batches)
        return [r.status_code for r in responses]

    assert set(asyncio.run(post_all())) == {202}
    ids = [e["event_id"] for e in events]
    wait_until(lambda: count_stored(cassandra, ids[-50:]) == 50, 30, "the last events to be stored")
    wait_until(lambda: count_stored(cassandra, ids) == 1000, 30, "all 1000 events to be stored")
    assert all(stored_rows(cassandra, eid) == (1, 1) for eid in ids)
    # And readable through the API, as written.
    for event in events[::50]:
        got = client.get(f"/v1/events/{event['event_id']}")
        assert got.status_code == 200
        assert got.json().get("status") == "stored"
        body = got.json()["event"]
        assert (body["listing_id"], body["type"]) == (event["listing_id"], event["type"])
        if event["type"] == "booking":
            assert (body["total_price"], body["currency"], body["guests"]) == ("449.70", "EUR", 2)
        assert body["occurred_at"] == "2026-11-25T08:30:00.250Z"


def test_event_is_readable_within_two_seconds(client: httpx.Client, worker: Service) -> None:
    event = view()
    started = time.monotonic()
    assert client.post("/v1/events", json=event).status_code == 202
    wait_until(lambda: client.get(f"/v1/events/{event['event_id']}").json().get("status") == "stored", 2, "the event")
    assert time.monotonic() - started < 2


def test_same_event_posted_twice_leaves_one_row(client: httpx.Client, worker: Service, cassandra: Session) -> None:
    event = booking()
    for _ in range(2):
        assert client.post("/v1/events", json=event).status_code == 202
    assert client.post("/v1/events/batch", json={"events": [event, event]}).json()["accepted"] == 2
    wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 10, "the event")
    time.sleep(0.5)  # give any later duplicate write its chance to show
    assert stored_rows(cassandra, event["event_id"]) == (1, 1)


def test_redelivered_task_leaves_one_row_and_the_same_cells(
    worker: Service, cassandra: Session, settings: Settings
) -> None:
    event = booking()
    celery = make_celery(settings)
    try:
        # The same message twice, as Redis redelivers it after a worker dies before acknowledging.
        for _ in range(2):
            celery.send_task(
                WRITE_EVENTS, args=[[event]], kwargs={"accepted_at": 1_764_063_000.5, "request_ids": ["r"]}
            )
    finally:
        celery.close()
    wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 10, "the event")
    row = cassandra.execute(
        "SELECT writetime(guests) AS wt, accepted_at FROM events_by_id WHERE event_id = %s",
        (UUID(event["event_id"]),),
    ).one()
    # The write timestamp comes from the event (occurred_at), not from the clock of either write.
    assert row.wt == round(utc(event["occurred_at"]).timestamp() * 1_000_000) == 1_795_595_400_250_000
    assert stored_rows(cassandra, event["event_id"]) == (1, 1)


def test_worker_retries_through_a_cassandra_outage(
    client: httpx.Client, servers: Servers, cassandra: Session, profile: Profile, log_dir: Path,
    empty_queue: redis.Redis, worker: Service,
) -> None:  # fmt: skip
    # A second worker with a short request timeout: while Cassandra is frozen its writes time out and the
    # task is retried with backoff until Cassandra answers again.
    worker.signal(signal.SIGSTOP)
    impatient = start_worker(
        profile, log_dir, name="worker-retry",
        SLUICE_CASSANDRA_REQUEST_TIMEOUT_S="1", SLUICE_TASK_RETRY_BACKOFF_S="0.5", SLUICE_TASK_RETRY_BACKOFF_MAX_S="2",
    )  # fmt: skip
    try:
        assert servers.cassandra is not None
        servers.cassandra.signal(signal.SIGSTOP)
        try:
            event = view()
            assert client.post("/v1/events", json=event).status_code == 202
            wait_until(lambda: "retrying in" in impatient.log_text(), 20, "the worker to retry the write")
        finally:
            servers.cassandra.signal(signal.SIGCONT)
        wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 30, "the event after the outage")
        assert empty_queue.hlen(keys.DEAD_LETTERS) == 0
    finally:
        impatient.stop()
        worker.signal(signal.SIGCONT)


def test_an_event_whose_message_was_lost_is_queued_again(
    worker: Service, cassandra: Session, redis_client: redis.Redis
) -> None:
    # As the API records an accepted event, but its message gone: taken off the queue by a worker that died
    # before it could record the delivery.
    event = queued_form(EVENT_ADAPTER.validate_python(booking()))
    long_ago = time.time() - 3600
    redis_client.hset(keys.QUEUED, event["event_id"], mark_value(event, long_ago))
    redis_client.zadd(keys.QUEUED_INDEX, {event["event_id"]: long_ago})
    wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 30, "the lost event to be re-queued")
    wait_until(lambda: not redis_client.hexists(keys.QUEUED, event["event_id"]), 5, "its record to be cleared")
    assert re.search(r"re-queued \d+ accepted events whose message was lost", worker.log_text())

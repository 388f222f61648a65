"""Every 202 stored exactly once: one version per event id (first write wins), marks that travel with their
message, nothing acknowledged that is nowhere, recovery under a backlog, and dead-letter replay that cannot
lose or shadow a record."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from cassandra.cluster import Session

from devstack import Profile, Servers
from sluice import keys, message
from sluice.events import EVENT_ADAPTER, fingerprint, queued_form
from sluice.marks import Marks, mark_value, parse_mark
from tests.support import AUTH, Service, booking, flushed_db, start_api, start_worker, stored_rows, view, wait_until
from worker.recovery import recover_lost

DB = 12


@pytest.fixture
def db(servers: Servers, profile: Profile) -> Iterator[redis.Redis]:
    yield from flushed_db(profile, DB)


@pytest.fixture
def lone_api(db: redis.Redis, cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    """An API on database DB, where no worker runs unless a test starts one: what it queues stays put."""
    service = start_api(profile, log_dir, name="api-once", SLUICE_API_PORT=str(profile.api_port + 20),
                        SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/{DB}")  # fmt: skip
    yield service
    service.stop()


def worker_on_db(profile: Profile, log_dir: Path, name: str, **env: str) -> Service:
    return start_worker(profile, log_dir, name=name, SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/{DB}",
                        **env)  # fmt: skip


def queued(event: dict[str, Any]) -> dict[str, Any]:
    return queued_form(EVENT_ADAPTER.validate_python(event))


def test_a_second_version_is_409_while_the_first_is_queued(lone_api: Service, db: redis.Redis) -> None:
    first = view()
    with httpx.Client(base_url=lone_api.base_url, headers=AUTH) as c:
        assert c.post("/v1/events", json=first).status_code == 202
        # The message and the event's mark went to Redis together.
        assert db.llen(keys.EVENTS_QUEUE) == 1
        assert parse_mark(db.hget(keys.QUEUED, first["event_id"])).event == queued(first)  # type: ignore[arg-type]

        other = first | {"occurred_at": "2026-11-25T09:31:00Z"}
        refused = c.post("/v1/events", json=other)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "conflict"
        assert refused.json()["error"]["details"][0]["loc"] == ["event_id"]
        # The same content again (another offset for the same instant) is a duplicate: accepted, not re-queued.
        same = first | {"occurred_at": "2026-11-25T08:30:00.250Z"}
        assert c.post("/v1/events", json=same).status_code == 202
        assert db.llen(keys.EVENTS_QUEUE) == 1

        fresh = booking()
        batch = c.post("/v1/events/batch", json={"events": [first, booking(event_id=first["event_id"]), fresh]})
        assert batch.status_code == 202, batch.text
        results = batch.json()["results"]
        assert [r["status"] for r in results] == ["accepted", "rejected", "accepted"]
        assert results[1]["errors"][0]["type"] == "conflict"
        assert results[1]["errors"][0]["loc"] == ["events", 1, "event_id"]
        assert batch.json()["accepted"] == 2
        # Two versions of one id inside one batch: the first is queued, the second refused.
        twin = view()
        inside = c.post("/v1/events/batch", json={"events": [twin, twin | {"user_id": 8}]})
        assert [r["status"] for r in inside.json()["results"]] == ["accepted", "rejected"]
        only = c.post("/v1/events/batch", json={"events": [other]})
        assert only.status_code == 409
        assert only.json()["error"]["code"] == "conflict"
    assert db.llen(keys.EVENTS_QUEUE) == 3  # first; fresh; twin (the duplicates and conflicts queued nothing)
    assert parse_mark(db.hget(keys.QUEUED, first["event_id"])).fingerprint == fingerprint(queued(first))  # type: ignore[arg-type]


def test_two_api_processes_accept_one_version(
    lone_api: Service, db: redis.Redis, cassandra: Session, profile: Profile, log_dir: Path
) -> None:
    second = start_api(profile, log_dir, name="api-once-2", SLUICE_API_PORT=str(profile.api_port + 21),
                       SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/{DB}")  # fmt: skip
    pairs = [(view(), None) for _ in range(40)]
    pairs = [(a, a | {"user_id": 99}) for a, _ in pairs]

    async def race() -> list[tuple[int, int]]:
        async with (
            httpx.AsyncClient(base_url=lone_api.base_url, headers=AUTH) as one,
            httpx.AsyncClient(base_url=second.base_url, headers=AUTH) as two,
        ):

            async def pair(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int]:
                ra, rb = await asyncio.gather(one.post("/v1/events", json=a), two.post("/v1/events", json=b))
                return ra.status_code, rb.status_code

            return await asyncio.gather(*(pair(a, b) for a, b in pairs))

    try:
        outcomes = asyncio.run(race())
    finally:
        second.stop()
    assert all(sorted(o) == [202, 409] for o in outcomes), outcomes
    # The mark holds the version that won, and only that one is queued.
    for (a, b), (status_a, _) in zip(pairs, outcomes, strict=True):
        winner = a if status_a == 202 else b
        mark = parse_mark(db.hget(keys.QUEUED, a["event_id"]))  # type: ignore[arg-type]
        assert mark.event == queued(winner)
    events = [e for raw in db.lrange(keys.EVENTS_QUEUE, 0, -1) for e in orjson.loads(orjson.loads(raw)["body"])[0][0]]
    assert sorted(e["event_id"] for e in events) == sorted(a["event_id"] for a, _ in pairs)


def test_a_second_version_after_the_first_is_stored_is_refused_by_the_worker(
    client: httpx.Client, worker: Service, cassandra: Session, redis_client: redis.Redis
) -> None:
    listing, elsewhere = random.randint(10**9, 10**12), random.randint(10**9, 10**12)
    first = booking(listing_id=listing, occurred_at="2026-11-25T10:00:00Z")
    assert client.post("/v1/events", json=first).status_code == 202
    wait_until(lambda: stored_rows(cassandra, first["event_id"]) == (1, 1), 10, "the first version")
    # Same id: a view of another listing at another time, and a view at the very same instant (which a
    # cell-by-cell merge would have turned into a row nobody posted).
    for second in (
        view(event_id=first["event_id"], listing_id=elsewhere, occurred_at="2026-11-25T11:00:00Z"),
        view(event_id=first["event_id"], listing_id=listing, occurred_at="2026-11-25T10:00:00Z"),
    ):
        assert client.post("/v1/events", json=second).status_code == 202  # the API cannot tell any more
        wait_until(lambda: redis_client.hexists(keys.DEAD_LETTERS, first["event_id"]), 10, "the conflict")
        record = orjson.loads(redis_client.hget(keys.DEAD_LETTERS, first["event_id"]))  # type: ignore[arg-type]
        assert record["kind"] == "conflict"
        assert record["event"] == queued(second)
        redis_client.hdel(keys.DEAD_LETTERS, first["event_id"])
    stored = client.get(f"/v1/events/{first['event_id']}").json()
    assert stored["event"] | {"accepted_at": None} == queued(first) | {"accepted_at": None}
    for listing_id, expected in ((listing, [first["event_id"]]), (elsewhere, [])):
        page = client.get(f"/v1/listings/{listing_id}/events",
                          params={"from": "2026-11-25T00:00:00Z", "to": "2026-11-26T00:00:00Z"}).json()  # fmt: skip
        assert [e["event_id"] for e in page["events"]] == expected
        rows = cassandra.execute("SELECT event_id FROM events_by_listing_day WHERE listing_id = %s AND day = %s",
                                 (listing_id, queued(first)["occurred_at"][:10])).all()  # fmt: skip
        assert len(rows) == len(expected)
    stats = client.get(f"/v1/listings/{listing}/stats", params={"from": "2026-11-25", "to": "2026-11-25"}).json()
    assert (stats["views"], stats["bookings"]) == (0, 1)
    assert (
        client.get(f"/v1/listings/{elsewhere}/stats", params={"from": "2026-11-25", "to": "2026-11-25"}).json()["views"]
        == 0
    )


def test_no_202_without_its_marks(lone_api: Service, db: redis.Redis) -> None:
    # The marks cannot be written (the key holds another type): the whole publish fails, nothing is queued.
    db.set(keys.QUEUED, "not a hash")
    with httpx.Client(base_url=lone_api.base_url, headers=AUTH) as c:
        refused = c.post("/v1/events", json=view())
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"]
        assert db.llen(keys.EVENTS_QUEUE) == 0
        db.delete(keys.QUEUED)
        time.sleep(0.3)  # the publisher fails fast for a moment after a failure
        assert c.post("/v1/events", json=view()).status_code == 202
    assert db.llen(keys.EVENTS_QUEUE) == 1


def test_an_identical_repost_of_a_price_in_another_spelling_is_a_duplicate(
    client: httpx.Client, worker: Service, cassandra: Session, redis_client: redis.Redis
) -> None:
    """``"0149.90"`` is stored as the decimal 149.90 and read back as ``"149.90"``: fields are compared in that
    stored form, so posting the very same bytes again after the write (or ``"149.90"``) is a duplicate, not
    a conflict."""
    event = booking(total_price="0149.90")
    body = orjson.dumps(event)
    headers = {"Content-Type": "application/json"}
    assert client.post("/v1/events", content=body, headers=headers).status_code == 202
    wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 10, "the event")
    assert client.get(f"/v1/events/{event['event_id']}").json()["event"]["total_price"] == "149.90"
    for again in (body, orjson.dumps(event | {"total_price": "149.90"})):
        wait_until(lambda: not redis_client.hexists(keys.QUEUED, event["event_id"]), 10, "the event's mark cleared")
        assert client.post("/v1/events", content=again, headers=headers).status_code == 202
        wait_until(lambda: not redis_client.hexists(keys.QUEUED, event["event_id"]), 10, "the re-post handled")
        assert not redis_client.hexists(keys.DEAD_LETTERS, event["event_id"]), redis_client.hget(
            keys.DEAD_LETTERS, event["event_id"]
        )
    assert client.get(f"/v1/events/{event['event_id']}").json()["status"] == "stored"
    assert stored_rows(cassandra, event["event_id"]) == (1, 1)


def test_a_refused_dead_letter_sends_the_message_back(
    db: redis.Redis, servers: Servers, cassandra: Session, profile: Profile, log_dir: Path
) -> None:
    """Writes fail (Cassandra frozen), the last attempt dead-letters, and Redis refuses that record: the
    message must go back to the queue, not be acknowledged with its event nowhere."""
    worker = worker_on_db(profile, log_dir, "worker-dlq-refused", SLUICE_TASK_MAX_RETRIES="0",
                          SLUICE_CASSANDRA_REQUEST_TIMEOUT_S="1")  # fmt: skip
    assert servers.cassandra is not None
    wait_until(lambda: worker.log_text().count("connected to Cassandra") >= 2, 20, "the worker's sessions")
    event = queued(view())
    try:
        db.set(keys.DEAD_LETTERS, "not a hash")  # every dead-letter write now fails (WRONGTYPE)
        servers.cassandra.signal(signal.SIGSTOP)
        try:
            Marks(db).enqueue(message.build([event], accepted_at=time.time(), request_ids=["t"]),
                              [(event["event_id"], mark_value(event, time.time()))])  # fmt: skip
            wait_until(lambda: "returning the message to the queue" in worker.log_text(), 30, "the refused record")
        finally:
            servers.cassandra.signal(signal.SIGCONT)
        db.delete(keys.DEAD_LETTERS)
        wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 60, "the event, written after all")
    finally:
        worker.stop()
    assert not db.hexists(keys.QUEUED, event["event_id"])


def _mark(db: redis.Redis, event: dict[str, Any], score: float) -> None:
    db.hset(keys.QUEUED, event["event_id"], mark_value(event, score))
    db.zadd(keys.QUEUED_INDEX, {event["event_id"]: score})


def _head_enqueued_at(db: redis.Redis, at: float) -> None:
    """A message at the head of the queue (the oldest), enqueued at ``at``."""
    envelope = orjson.loads(message.build([queued(view())], accepted_at=at, request_ids=["t"]).payload)
    envelope["headers"]["sluice_enqueued_at"] = at
    db.rpush(keys.EVENTS_QUEUE, orjson.dumps(envelope))


def test_recovery_runs_under_a_backlog(db: redis.Redis) -> None:
    now = time.time()
    lost, waiting = queued(view()), queued(view())
    _mark(db, lost, now - 600)  # its message went before the head of the queue was queued: lost
    _mark(db, waiting, now - 400)  # queued after the head: still waiting its turn behind it
    _head_enqueued_at(db, now - 500)
    db.lpush(keys.EVENTS_QUEUE, message.build([queued(view())], accepted_at=now, request_ids=["t"]).payload)
    assert recover_lost(Marks(db), older_than_s=60) == 1
    assert db.llen(keys.EVENTS_QUEUE) == 3
    newest = orjson.loads(orjson.loads(db.lindex(keys.EVENTS_QUEUE, 0))["body"])  # type: ignore[arg-type]
    assert newest[0][0] == [lost]
    assert db.zscore(keys.QUEUED_INDEX, lost["event_id"]) > now  # type: ignore[operator]
    assert db.zscore(keys.QUEUED_INDEX, waiting["event_id"]) == now - 400


def test_recovery_leaves_alone_what_a_worker_holds(db: redis.Redis) -> None:
    """An old mark whose message a worker has taken (kombu's unacknowledged set: being written, or waiting
    for its retry to be due) is not lost; one whose message is nowhere is."""
    now = time.time()
    held, lost = queued(view()), queued(view())
    _mark(db, held, now - 600)
    _mark(db, lost, now - 600)
    envelope = orjson.loads(message.build([held], accepted_at=now - 600, request_ids=["t"]).payload)
    db.hset(keys.UNACKED, "some-delivery-tag", orjson.dumps([envelope, "", keys.EVENTS_QUEUE]))
    assert recover_lost(Marks(db), older_than_s=60) == 1
    requeued = orjson.loads(orjson.loads(db.lindex(keys.EVENTS_QUEUE, 0))["body"])  # type: ignore[arg-type]
    assert requeued[0][0] == [lost]


def test_a_stray_mark_of_a_stored_event_is_cleared_without_a_rewrite(
    client: httpx.Client, worker: Service, cassandra: Session, redis_client: redis.Redis
) -> None:
    event = view()
    assert client.post("/v1/events", json=event).status_code == 202
    wait_until(lambda: stored_rows(cassandra, event["event_id"]) == (1, 1), 10, "stored")
    written = client.get(f"/v1/events/{event['event_id']}").json()["write_time"]
    # A mark left behind (its worker could not clear it): recovery re-queues it, the worker finds it stored.
    _mark(redis_client, queued(event), time.time() - 3600)
    wait_until(lambda: not redis_client.hexists(keys.QUEUED, event["event_id"]), 40, "the stray mark to go")
    assert stored_rows(cassandra, event["event_id"]) == (1, 1)
    assert client.get(f"/v1/events/{event['event_id']}").json()["write_time"] == written


def test_replay_deletes_only_the_record_it_replayed(db: redis.Redis) -> None:
    event = queued(view())
    record = orjson.dumps({"event": event, "reason": "newer failure", "kind": "write_failed"})
    db.hset(keys.DEAD_LETTERS, event["event_id"], record)
    stale = orjson.dumps({"event": event, "reason": "older failure", "kind": "write_failed"})
    marks = Marks(db)
    msg = message.build([event], accepted_at=time.time(), request_ids=["replay"])
    assert marks.replay(msg, event["event_id"], stale, mark_value(event, 1.0)) == "changed"
    assert db.hget(keys.DEAD_LETTERS, event["event_id"]) == record
    assert db.llen(keys.EVENTS_QUEUE) == 0
    # Another version holds the id: replaying this one would make two versions.
    _mark(db, event | {"user_id": 99}, time.time())
    assert marks.replay(msg, event["event_id"], record, mark_value(event, 1.0)) == "conflict"
    assert db.llen(keys.EVENTS_QUEUE) == 0
    db.delete(keys.QUEUED, keys.QUEUED_INDEX)
    # The record as read: its mark first, then its message, then the record itself, together.
    assert marks.replay(msg, event["event_id"], record, mark_value(event, 1.0)) == "ok"
    assert db.llen(keys.EVENTS_QUEUE) == 1
    assert parse_mark(db.hget(keys.QUEUED, event["event_id"])).event == event  # type: ignore[arg-type]
    assert db.zscore(keys.QUEUED_INDEX, event["event_id"]) is not None
    assert not db.hexists(keys.DEAD_LETTERS, event["event_id"])


def test_the_publish_script_settles_a_message_larger_than_its_chunks(db: redis.Redis) -> None:
    """The publish script (sluice/marks.py) reads and writes marks a thousand at a time: a message of 2,500
    events (an SDK batch may hold 20,000) is written whole with every mark and index entry, and a second
    message with the same ids writes nothing and answers each id's status, across the chunks' bounds."""
    events = [queued(view()) for _ in range(2500)]
    now = time.time()
    marks = Marks(db)
    first = message.build(events, accepted_at=now, request_ids=["chunks"])
    assert marks.enqueue(first, [(e["event_id"], mark_value(e, now)) for e in events]) == []
    assert db.llen(keys.EVENTS_QUEUE) == 1
    assert db.hlen(keys.QUEUED) == 2500
    assert db.zcard(keys.QUEUED_INDEX) == 2500
    assert parse_mark(db.hget(keys.QUEUED, events[2499]["event_id"])).event == events[2499]  # type: ignore[arg-type]
    # Again, with the 1,001st event changed and one new event last: nothing written, a status each.
    again = [*events[:1000], {**events[1000], "user_id": events[1000]["user_id"] + 1}, *events[1001:], queued(view())]
    statuses = marks.enqueue(message.build(again, accepted_at=now, request_ids=["chunks"]),
                             [(e["event_id"], mark_value(e, now)) for e in again])  # fmt: skip
    assert statuses == ["d"] * 1000 + ["c"] + ["d"] * 1499 + ["n"]
    assert db.llen(keys.EVENTS_QUEUE) == 1
    assert db.hlen(keys.QUEUED) == 2500

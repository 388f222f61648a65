"""Poison messages go to the dead-letter store with the reason; the events queued with them are written;
and the dead-letter command lists, shows, replays (exactly once) and purges them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from cassandra.cluster import Session
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

from devstack import PROJECT, Profile, Servers
from devstack.services import Service
from loadtests.poison import envelope
from sluice import keys, message
from sluice.deadletters import Item, add, raw_bytes
from sluice.queue import WRITE_EVENTS, make_celery
from sluice.settings import Settings
from tests.support import booking, service_env, start_worker, stored_rows, view, wait_until

DB = 8


@pytest.fixture
def queue_settings(profile: Profile) -> Settings:
    return Settings(redis_url=f"redis://127.0.0.1:{profile.redis_port}/{DB}")


@pytest.fixture
def db(servers: Servers, queue_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(queue_settings.redis_url)
    client.delete(keys.EVENTS_QUEUE, keys.UNACKED, keys.UNACKED_INDEX, keys.DEAD_LETTERS)
    yield client
    client.close()


@pytest.fixture
def celery(queue_settings: Settings) -> Iterator[Celery]:
    app = make_celery(queue_settings)
    yield app
    app.close()


def dead_letters(client: redis.Redis) -> dict[str, dict[str, object]]:
    return {k.decode(): json.loads(v) for k, v in client.hgetall(keys.DEAD_LETTERS).items()}


def cli(profile: Profile, *args: str) -> subprocess.CompletedProcess[str]:
    env = service_env(profile, SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/{DB}")
    return subprocess.run(
        [str(Path(sys.executable).with_name("sluice")), "dlq", *args],
        env={**os.environ, **env}, cwd=PROJECT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_poison_messages_do_not_block_the_events_queued_with_them(
    db: redis.Redis, celery: Celery, queue_settings: Settings, cassandra: Session, profile: Profile, log_dir: Path
) -> None:
    good_before, good_beside, good_after = view(), booking(), view()
    old_format = {"event_id": "0d7e1f0c-0000-4000-8000-000000000001", "kind": "view", "listing": "42"}
    # 1. A message no JSON decoder can read, as a broken producer might write it.
    exchange = Exchange(keys.EVENTS_QUEUE, "direct")
    with Connection(queue_settings.redis_url) as conn:
        Producer(conn).publish(
            b'{"not": json', exchange=exchange, routing_key=keys.EVENTS_QUEUE,
            declare=[Queue(keys.EVENTS_QUEUE, exchange, routing_key=keys.EVENTS_QUEUE)],
            content_type="application/json", content_encoding="utf-8",
            headers={"task": WRITE_EVENTS, "id": "poison-undecodable", "lang": "py"},
        )  # fmt: skip
    celery.send_task(WRITE_EVENTS, args=[[good_before], time.time()])
    # 2. An older producer's event beside a valid one in one message.
    celery.send_task(WRITE_EVENTS, args=[[old_format, good_beside], time.time()])
    # 3. An older producer's arguments, and a task this worker does not know.
    celery.send_task(WRITE_EVENTS, kwargs={"event": good_after})
    celery.send_task("sluice.write_event_v0", args=[good_after])
    celery.send_task(WRITE_EVENTS, args=[[good_after], time.time()])

    worker = start_worker(profile, log_dir, name="worker-poison", SLUICE_REDIS_URL=queue_settings.redis_url)
    try:
        for event in (good_before, good_beside, good_after):
            wait_until(lambda e=event: stored_rows(cassandra, e["event_id"]) == (1, 1), 20, "the valid events")
        wait_until(lambda: len(dead_letters(db)) == 4, 10, "four dead letters")
    finally:
        worker.stop()
    letters = dead_letters(db)
    reasons = sorted(str(record["reason"]) for record in letters.values())
    assert any(r.startswith("undecodable message (application/json)") for r in reasons), reasons
    assert any(r.startswith("unknown task") and "write_event_v0" in r for r in reasons), reasons
    assert any(r.startswith("malformed task arguments") for r in reasons), reasons
    old = letters[old_format["event_id"]]
    assert old["event"] == old_format
    assert "type" in str(old["reason"])
    assert db.llen(keys.EVENTS_QUEUE) == 0
    assert db.hlen(keys.UNACKED) == 0


def test_failed_writes_are_dead_lettered_then_replayed_exactly_once(
    db: redis.Redis, celery: Celery, queue_settings: Settings, servers: Servers, cassandra: Session,
    profile: Profile, log_dir: Path,
) -> None:  # fmt: skip
    events = [view(), booking()]
    worker: Service = start_worker(
        profile, log_dir, name="worker-deadletter", SLUICE_REDIS_URL=queue_settings.redis_url,
        SLUICE_CASSANDRA_REQUEST_TIMEOUT_S="1", SLUICE_TASK_MAX_RETRIES="1",
    )  # fmt: skip
    assert servers.cassandra is not None
    # Both pool processes connected before Cassandra freezes: connecting to a frozen node takes its own time.
    wait_until(lambda: worker.log_text().count("connected to Cassandra") >= 2, 20, "the worker's sessions")
    try:
        servers.cassandra.signal(signal.SIGSTOP)
        try:
            celery.send_task(WRITE_EVENTS, args=[events, time.time()])
            wait_until(lambda: len(dead_letters(db)) == 2, 60, "the events to be dead-lettered after 2 attempts")
        finally:
            servers.cassandra.signal(signal.SIGCONT)
        letters = dead_letters(db)
        assert set(letters) == {e["event_id"] for e in events}
        assert all("write failed after 2 attempts" in str(r["reason"]) for r in letters.values())
        assert all(stored_rows(cassandra, e["event_id"])[0] in (0, 1) for e in events)

        listed = cli(profile, "list")
        assert listed.returncode == 0, listed.stderr
        assert all(e["event_id"] in listed.stdout for e in events)
        assert "2 dead letter(s)" in listed.stderr
        shown = cli(profile, "show", events[1]["event_id"])
        assert json.loads(shown.stdout)["event"]["total_price"] == "449.70"
        assert cli(profile, "show", "no-such-id").returncode == 1

        replayed = cli(profile, "replay", "--all")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 2 event(s)" in replayed.stdout
        for event in events:
            wait_until(lambda e=event: stored_rows(cassandra, e["event_id"]) == (1, 1), 30, "the replayed event")
        assert dead_letters(db) == {}
        # Replaying an event that is already stored leaves it stored once.
        add(db, [Item(events[0], "test: replay of a stored event")], kind="write_failed", task_id=None, attempts=1)
        assert cli(profile, "replay", events[0]["event_id"]).returncode == 0
        time.sleep(1)
        assert stored_rows(cassandra, events[0]["event_id"]) == (1, 1)

        add(db, [Item(view(), "test: to purge")], kind="write_failed", task_id=None, attempts=1)
        purged = cli(profile, "purge", "--all")
        assert "purged 1 dead letter(s)" in purged.stdout
        assert dead_letters(db) == {}
    finally:
        worker.stop()


def _envelope(**changes: Any) -> dict[str, Any]:
    """A valid envelope of an empty batch, with some parts replaced (the chaos producer's own)."""
    return envelope("t", **changes)


def test_malformed_bytes_on_the_queue_are_dead_lettered_and_the_worker_goes_on(
    db: redis.Redis, queue_settings: Settings, cassandra: Session, profile: Profile, log_dir: Path
) -> None:
    """Bytes LPUSHed straight onto the queue, as a broken producer or a hand on redis-cli might: each ends as a
    dead letter holding exactly those bytes and the reason, the worker never stops, and the events of the
    valid messages around them are stored."""
    cap = 1024 * 1024
    whole = message.build([view()], accepted_at=time.time(), request_ids=["t"]).payload
    huge = message.build([view() for _ in range(8000)], accepted_at=time.time(), request_ids=["t"]).payload
    assert len(huge) > cap
    poison = {
        b'{"not": json': "not UTF-8 JSON",
        whole[: len(whole) // 2]: "not UTF-8 JSON",  # truncated
        b"\xff\xfe" + whole: "not UTF-8 JSON",
        b'{"task": "sluice.write_events", "args": []}': "not a kombu envelope",
        b"[1, 2, 3]": "a JSON list, not a kombu envelope",
        orjson.dumps(_envelope(body=orjson.dumps({"events": []}).decode())): "invalid task message: ValueError",
        orjson.dumps(_envelope(body={"events": []})): "the body is a JSON dict, not a string",
        orjson.dumps(_envelope(properties__body_encoding="base64", body="%%% not base64")): "Invalid base64",
        orjson.dumps(_envelope(headers__eta="tomorrow")): "invalid ETA",
        orjson.dumps(_envelope(headers__task=["a", "list"])): "unhashable type",
        b"x" * (cap - 10): "not UTF-8 JSON",  # big, under the cap: parsed and refused
        huge: "over SLUICE_MAX_MESSAGE_BYTES",  # over the cap: refused before parsing
    }
    good = [view() for _ in range(3)]
    db.lpush(keys.EVENTS_QUEUE, message.build([good[0]], accepted_at=time.time(), request_ids=["t"]).payload)
    for i, raw in enumerate(poison):
        db.lpush(keys.EVENTS_QUEUE, raw)
        if i == 5:
            db.lpush(keys.EVENTS_QUEUE, message.build([good[1]], accepted_at=time.time(), request_ids=["t"]).payload)
    db.lpush(keys.EVENTS_QUEUE, message.build([good[2]], accepted_at=time.time(), request_ids=["t"]).payload)

    worker = start_worker(profile, log_dir, name="worker-malformed", SLUICE_REDIS_URL=queue_settings.redis_url,
                          SLUICE_MAX_MESSAGE_BYTES=str(cap), SLUICE_MAX_BATCH_EVENTS="100",
                          SLUICE_PUBLISH_MAX_EVENTS="100")  # fmt: skip
    try:
        for event in good:
            wait_until(lambda e=event: stored_rows(cassandra, e["event_id"]) == (1, 1), 30, "the valid events")
        wait_until(lambda: len(dead_letters(db)) == len(poison), 20, "a dead letter per malformed message")
        time.sleep(1)
        assert worker.alive(), worker.log_text()[-3000:]
    finally:
        worker.stop()
    kept = {raw_bytes(r["event"]): r for r in dead_letters(db).values()}
    for raw, why in poison.items():
        assert raw in kept, f"no dead letter holds {raw[:60]!r}"
        assert why in str(kept[raw]["reason"]), (why, kept[raw]["reason"])
        assert kept[raw]["attempts"] == 1
    assert db.llen(keys.EVENTS_QUEUE) == 0
    assert db.hlen(keys.UNACKED) == 0
    assert "Unrecoverable error" not in worker.log_text()


def test_a_worker_that_stops_unexpectedly_exits_non_zero(
    db: redis.Redis, queue_settings: Settings, profile: Profile, log_dir: Path
) -> None:
    """A queue key holding a string (an operator's slip) is an error Celery cannot recover from: the worker
    stops, and says so with its exit code, so a supervisor restarts it (and ``make up`` reports it)."""
    db.set(keys.EVENTS_QUEUE, "not a list")
    try:
        env = service_env(profile, SLUICE_REDIS_URL=queue_settings.redis_url)
        worker = Service("worker-unrecoverable", "worker", env, log_dir)
        try:
            code = worker.proc.wait(timeout=60)
        finally:
            worker.stop()
    finally:
        db.delete(keys.EVENTS_QUEUE)
    assert "Unrecoverable error" in worker.log_text()
    assert code != 0


def test_an_integer_over_64_bits_is_dead_lettered_once(
    db: redis.Redis, celery: Celery, queue_settings: Settings, cassandra: Session, profile: Profile, log_dir: Path
) -> None:
    """JSON allows any integer, orjson writes only 64-bit ones: the dead letter keeps such an event in its raw
    form, after one attempt, and the valid event beside it is stored."""
    big, good = view(listing_id=2**70), view()
    celery.send_task(WRITE_EVENTS, args=[[big, good], time.time()])
    worker = start_worker(profile, log_dir, name="worker-bigint", SLUICE_REDIS_URL=queue_settings.redis_url)
    try:
        wait_until(lambda: stored_rows(cassandra, good["event_id"]) == (1, 1), 20, "the valid event")
        wait_until(lambda: big["event_id"] in dead_letters(db), 10, "the event with a 71-bit listing id")
        wait_until(lambda: db.llen(keys.EVENTS_QUEUE) + db.hlen(keys.UNACKED) == 0, 10, "the message to be done")
    finally:
        worker.stop()
    record = dead_letters(db)[big["event_id"]]
    assert record["attempts"] == 1
    assert "listing_id" in str(record["reason"])
    assert json.loads(raw_bytes(record["event"]) or b"") == big  # every digit kept
    assert "returning the message to the queue" not in worker.log_text()

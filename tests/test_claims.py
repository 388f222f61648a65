"""The worker's transport takes what waits in the queue in one step, recorded as kombu records a delivery
(worker/transport.py), on real Redis with kombu's own consumer: no message is ever in neither the queue nor the
unacknowledged set, a run's acks go together, and what is handed back comes back as it was."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from devstack import Profile, Servers
from sluice import keys
from sluice.queue import make_celery
from sluice.settings import get_settings
from tests.support import flushed_db
from tests.test_batching import enqueue
from worker.transport import CLAIM_ITEM_BYTES, Transport

pytestmark = pytest.mark.timeout(60)

DB = 14


@pytest.fixture
def db(servers: Servers, profile: Profile) -> Iterator[redis.Redis]:
    yield from flushed_db(profile, DB)


def exec_calls(db: redis.Redis) -> int:
    """Transactions (MULTI/EXEC pipelines, as kombu records and acks) this Redis has run."""
    return int(db.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


def consume(profile: Profile, prefetch: int) -> Iterator[tuple[Any, list[Any]]]:
    """A kombu consumer of the events queue on the worker's transport, configured as the worker's (its keys);
    yields (connection, messages got)."""
    options = make_celery(get_settings()).conf.broker_transport_options
    got: list[Any] = []
    queue = Queue(keys.EVENTS_QUEUE, Exchange(keys.EVENTS_QUEUE, type="direct"), routing_key=keys.EVENTS_QUEUE)
    on_message = [lambda _body, message: got.append(message)]
    url = f"redis://127.0.0.1:{profile.redis_port}/{DB}"
    with (
        Connection(url, transport=Transport, transport_options=options) as conn,
        Consumer(conn, [queue], callbacks=on_message, prefetch_count=prefetch),
    ):
        yield conn, got


def test_one_read_takes_every_waiting_message_up_to_the_prefetch_room(db: redis.Redis, profile: Profile) -> None:
    enqueue(db, 30)
    for conn, got in consume(profile, prefetch=20):
        transactions = exec_calls(db)
        conn.drain_events(timeout=5)
        # kombu alone delivers one message per read (its BRPOP); the claim took the rest of the room.
        assert len(got) == 20
        # kombu records each delivery in a transaction of its own; the claim recorded them all (1: slack for
        # another client of this Redis).
        assert exec_calls(db) - transactions <= 1
        assert db.llen(keys.EVENTS_QUEUE) == 10
        # Each is recorded as kombu records a delivery: restorable from the hash, indexed for the timeout.
        assert db.hlen(keys.UNACKED) == 20
        assert db.zcard(keys.UNACKED_INDEX) == 20
        assert all(db.hexists(keys.UNACKED, m.delivery_tag) for m in got)

        # Without a hub (a plain kombu consumer), each ack goes at once. (A worker's acks go a run at a time:
        # tests/test_batching.py counts them.)
        for message in got[:15]:
            message.ack()
        assert db.hlen(keys.UNACKED) == 5
        assert db.zcard(keys.UNACKED_INDEX) == 5

        # Handed back (as on a lost run): the queue gets the messages again, readable by kombu.
        for message in got[15:]:
            message.reject(requeue=True)
        assert db.hlen(keys.UNACKED) == 0
        assert db.llen(keys.EVENTS_QUEUE) == 15
        got.clear()
        conn.drain_events(timeout=5)
        assert len(got) == 15
        # kombu hands a rejected message back to the head of the queue: it comes after those that waited.
        assert [bool(m.headers.get("redelivered")) for m in got] == [False] * 10 + [True] * 5


def test_a_message_too_large_to_decode_in_redis_is_left_for_the_next_read(db: redis.Redis, profile: Profile) -> None:
    enqueue(db, 3)
    # The oldest message (taken first: BRPOP pops the right end) stays small; the second is made too large.
    second = db.lindex(keys.EVENTS_QUEUE, -2)
    assert second is not None
    padded = second[:-1] + b', "padding": "' + b"x" * CLAIM_ITEM_BYTES + b'"}'
    db.lset(keys.EVENTS_QUEUE, -2, padded)
    large = json.loads(padded)["properties"]["delivery_tag"]
    for conn, got in consume(profile, prefetch=10):
        conn.drain_events(timeout=5)
        assert len(got) == 1, "the claim stops before a message Redis should not decode"
        conn.drain_events(timeout=5)
        assert len(got) >= 2
        assert got[1].delivery_tag == large
        assert db.hexists(keys.UNACKED, got[1].delivery_tag), "taken by BRPOP and recorded by the next claim"
        while len(got) < 3:
            conn.drain_events(timeout=5)
        assert db.hlen(keys.UNACKED) == 3

"""Backpressure: over the queue-depth limit the API answers 503 with Retry-After; Redis never evicts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio
from cassandra.cluster import Session

from api.backpressure import QueueMonitor
from devstack import Profile
from sluice import keys
from tests.support import AUTH, Service, start_api, start_worker, view, wait_until

DB = 9


@pytest.fixture
def queue(servers: object, profile: Profile) -> Iterator[redis.Redis]:
    client = redis.Redis(port=profile.redis_port, db=DB)
    client.delete(keys.EVENTS_QUEUE, keys.UNACKED, keys.UNACKED_INDEX, keys.DRAINED_MESSAGES)
    yield client
    client.close()


@pytest.fixture
def small_api(queue: redis.Redis, cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    service = start_api(
        profile, log_dir, name="api-backpressure", SLUICE_API_PORT=str(profile.api_port + 4),
        SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/{DB}", SLUICE_MAX_QUEUE_DEPTH="5",
    )  # fmt: skip
    yield service
    service.stop()


def test_over_the_limit_the_api_refuses_with_retry_after_and_recovers(
    small_api: Service, queue: redis.Redis, profile: Profile, log_dir: Path
) -> None:
    with httpx.Client(base_url=small_api.base_url, headers=AUTH) as c:
        for _ in range(5):  # one message each: requests one after another do not share a message
            assert c.post("/v1/events", json=view()).status_code == 202
        assert queue.llen(keys.EVENTS_QUEUE) == 5

        time.sleep(0.6)  # the API samples the queue depth every 0.25 s
        response = c.post("/v1/events", json=view())
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "queue_full"
        # No worker drains this queue yet: the API cannot promise room soon.
        assert response.headers["retry-after"] == "30"
        assert queue.llen(keys.EVENTS_QUEUE) == 5, "a refused request must not queue anything"

        worker = start_worker(profile, log_dir, name="worker-backpressure",
                              SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/{DB}")  # fmt: skip
        try:
            wait_until(lambda: c.post("/v1/events", json=view()).status_code == 202, 20, "room in the queue again")
            # The workers count what they drain: that rate is what Retry-After is computed from.
            wait_until(lambda: int(queue.get(keys.DRAINED_MESSAGES) or 0) >= 6, 20, "the queue to be drained")
        finally:
            worker.stop()


@pytest.mark.parametrize(
    ("depth", "drain_per_s", "expected"),
    # Retry-After: the time to drain back to 90% of the limit (10 here) at the current rate, in 1..60 s.
    [(4, 0.0, None), (10, 0.0, 30), (13, 1.0, 4), (100, 2.0, 46), (10_000, 1.0, 60), (12, 1000.0, 1)],
)
def test_retry_after_follows_the_drain_rate(depth: int, drain_per_s: float, expected: int | None) -> None:
    monitor = QueueMonitor(redis.asyncio.Redis(), max_depth=10)
    monitor.depth, monitor.drain_per_s = depth, drain_per_s
    assert monitor.retry_after() == expected


def test_redis_never_evicts_and_a_full_redis_is_a_503(
    isolated_client: httpx.Client, isolated_queue: redis.Redis
) -> None:
    queue = isolated_queue
    assert queue.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert queue.config_get("appendonly") == {"appendonly": "yes"}
    assert queue.config_get("appendfsync") == {"appendfsync": "always"}
    before = queue.config_get("maxmemory")["maxmemory"]
    # Something queued before Redis fills up: it is what must not be evicted. (With the limit lowered first,
    # the API's memory check can refuse the very first request, and nothing would be there to watch.)
    assert isolated_client.post("/v1/events/batch", json={"events": [view() for _ in range(50)]}).status_code == 202
    used = int(queue.info("memory")["used_memory"])
    queue.config_set("maxmemory", used + 200_000)
    try:
        response = None
        for _ in range(200):
            response = isolated_client.post("/v1/events/batch", json={"events": [view() for _ in range(50)]})
            if response.status_code != 202:
                break
        assert response is not None
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        # The API's own memory check (queue_full) usually answers first; Redis's refusal is the backstop.
        assert error["code"] in ("queue_full", "queue_unavailable"), error
        assert "full" in error["message"] or "maxmemory" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
        queued = queue.llen(keys.EVENTS_QUEUE)
        assert queued > 0
    finally:
        queue.config_set("maxmemory", before)
    # Nothing queued was evicted to make room.
    assert queue.llen(keys.EVENTS_QUEUE) == queued
    time.sleep(0.3)  # past the publisher's fail-fast window
    assert isolated_client.post("/v1/events", json=view()).status_code == 202


def test_redis_memory_near_its_limit_is_a_503_before_redis_refuses(
    isolated_client: httpx.Client, isolated_queue: redis.Redis
) -> None:
    queue = isolated_queue
    before = queue.config_get("maxmemory")["maxmemory"]
    used = int(queue.info("memory")["used_memory"])
    # 85 % full: Redis still takes writes, but the API (at 80 % by default) stops adding to it.
    queue.config_set("maxmemory", int(used / 0.85))
    try:
        time.sleep(0.6)  # the API samples Redis every 0.25 s
        response = isolated_client.post("/v1/events", json=view())
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "queue_full"
        assert "Redis is 8" in response.json()["error"]["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert queue.llen(keys.EVENTS_QUEUE) == 0
        queue.set("sluice:test:probe", "redis itself still takes writes")
    finally:
        queue.config_set("maxmemory", before)
        queue.delete("sluice:test:probe")
    time.sleep(0.6)
    assert isolated_client.post("/v1/events", json=view()).status_code == 202


def test_a_backlog_is_messages_waiting_for_two_samples_in_a_row(isolated_queue: redis.Redis, profile: Profile) -> None:
    """What turns the publisher's backlog linger on: one sample that catches a message between its push and
    a worker's pop is not a backlog; a message still there at the next sample is."""

    async def run() -> list[bool]:
        client = redis.asyncio.Redis(port=profile.redis_port, db=1)
        monitor = QueueMonitor(client, max_depth=10)
        seen = []
        try:
            await monitor.sample()
            seen.append(monitor.backlogged())  # empty queue
            isolated_queue.lpush(keys.EVENTS_QUEUE, b"m")
            await monitor.sample()
            seen.append(monitor.backlogged())  # first sight of a message
            await monitor.sample()
            seen.append(monitor.backlogged())  # still there
            isolated_queue.delete(keys.EVENTS_QUEUE)
            await monitor.sample()
            seen.append(monitor.backlogged())  # taken
        finally:
            await client.aclose()
        return seen

    assert asyncio.run(run()) == [False, False, True, False]


def test_messages_a_lingering_worker_holds_are_no_backlog(isolated_queue: redis.Redis, profile: Profile) -> None:
    """A worker that lingers leaves up to a claim's worth of messages waiting on purpose: only more than that,
    seen twice in a row, turns the publisher's backlog linger on."""

    async def run() -> list[bool]:
        client = redis.asyncio.Redis(port=profile.redis_port, db=1)
        monitor = QueueMonitor(client, max_depth=1000, held=3)
        seen = []
        try:
            for _ in range(3):
                isolated_queue.lpush(keys.EVENTS_QUEUE, b"m")
                await monitor.sample()
                seen.append(monitor.backlogged())  # 1, 2, 3 held: a lingering worker's
            isolated_queue.lpush(keys.EVENTS_QUEUE, b"m")
            await monitor.sample()
            seen.append(monitor.backlogged())  # 4, but the sample before saw 3
            await monitor.sample()
            seen.append(monitor.backlogged())  # still 4: behind
        finally:
            await client.aclose()
        return seen

    assert asyncio.run(run()) == [False, False, False, False, True]

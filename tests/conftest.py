"""Fixtures: the real Redis and Cassandra (test profile ports and data folder), the API and a worker.

The servers start once per test session through the same launcher ``make up`` uses; API and worker run
as real processes. Tests that only need the event model do not start anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from cassandra.cluster import Session

from devstack import PROFILES, Profile, Servers
from sluice import keys
from sluice.cassandra import apply_schema, connect
from sluice.settings import Settings
from tests.support import AUTH, Service, start_api, start_worker

#: ``SLUICE_TEST_PROFILE=chaos`` runs tests on the chaos profile's ports and data folder (beside a test run).
PROFILE = PROFILES[os.environ.get("SLUICE_TEST_PROFILE", "test")]


@pytest.fixture(scope="session")
def profile() -> Profile:
    return PROFILE


@pytest.fixture(scope="session")
def settings(profile: Profile) -> Settings:
    return Settings(
        redis_url=f"redis://127.0.0.1:{profile.redis_port}/0",
        cassandra_contact_points=["127.0.0.1"],
        cassandra_port=profile.cassandra_port,
    )


@pytest.fixture(scope="session")
def servers(profile: Profile) -> Iterator[Servers]:
    # SLUICE_TEST_REUSE_SERVERS=1: use the profile's servers already running (``sluice dev servers
    # --profile ...``) instead of starting fresh ones, to iterate on a few tests quickly.
    if os.environ.get("SLUICE_TEST_REUSE_SERVERS") == "1":
        yield Servers(profile)
        return
    stack = Servers(profile, fresh=True).start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def cassandra(servers: Servers, settings: Settings) -> Iterator[Session]:
    cluster, session = connect(settings)
    apply_schema(session, settings)
    session.set_keyspace(settings.cassandra_keyspace)
    try:
        yield session
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def redis_client(servers: Servers, settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def log_dir(profile: Profile) -> Path:
    return profile.root / "logs"


@pytest.fixture(scope="session")
def api(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    service = start_api(profile, log_dir)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def worker(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    service = start_worker(profile, log_dir)
    yield service
    service.stop()


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.base_url, timeout=10, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="session")
def isolated_api(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    """An API publishing to Redis database 1, where no worker consumes: what it queues stays countable."""
    service = start_api(
        profile, log_dir, name="api-db1", SLUICE_API_PORT=str(profile.api_port + 1),
        SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/1",
    )  # fmt: skip
    yield service
    service.stop()


@pytest.fixture
def isolated_client(isolated_api: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=isolated_api.base_url, timeout=10, headers=AUTH) as c:
        yield c


@pytest.fixture
def isolated_queue(servers: Servers, profile: Profile) -> Iterator[redis.Redis]:
    """The queue the isolated API publishes to, empty at the start of the test."""
    client = redis.Redis(port=profile.redis_port, db=1)
    client.delete(keys.EVENTS_QUEUE)
    yield client
    client.delete(keys.EVENTS_QUEUE)
    client.close()


@pytest.fixture
def empty_queue(redis_client: redis.Redis) -> redis.Redis:
    """A queue with nothing in it and nothing unacknowledged, for tests that count messages."""
    redis_client.delete(keys.EVENTS_QUEUE, keys.UNACKED, keys.UNACKED_INDEX, keys.DEAD_LETTERS)
    return redis_client

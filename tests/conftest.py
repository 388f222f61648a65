"""Fixtures: the real Redis and Cassandra (test profile ports and data folder), the API and a worker.

The servers start once per test session through the same launcher ``make up`` uses; API and worker run
as real processes. Tests that only need the event model do not start anything.
"""

from __future__ import annotations

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
from tests.support import Service, start_api, start_worker

PROFILE = PROFILES["test"]


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
def client(api: Service, profile: Profile) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{profile.api_port}", timeout=10) as c:
        yield c


@pytest.fixture
def empty_queue(redis_client: redis.Redis) -> redis.Redis:
    """A queue with nothing in it and nothing unacknowledged, for tests that count messages."""
    redis_client.delete(keys.EVENTS_QUEUE, keys.UNACKED, keys.UNACKED_INDEX, keys.DEAD_LETTERS)
    return redis_client

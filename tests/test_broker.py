"""sluice.broker: one-node and Sentinel URLs, against a real redis-server and a real sentinel (redis-server
--sentinel), and the API's replica confirmation (WAIT) against a real primary and replica.

The failover itself, under load and with every tier in containers, is tests/containers/test_ha.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devstack._redis import find_redis_server
from sluice import broker, keys, message
from sluice.marks import AsyncMarks, ReplicasUnconfirmed, mark_value
from sluice.settings import Settings
from tests.support import view, wait_until


def test_sentinel_urls_are_read_as_kombu_writes_them() -> None:
    target = broker.parse_sentinels("sentinel://:s3cret@s1:26379;sentinel://s2:26380;sentinel://s3/2")
    assert target is not None
    assert target.sentinels == [("s1", 26379), ("s2", 26380), ("s3", 26379)]
    assert (target.db, target.password) == (2, "s3cret")
    assert broker.parse_sentinels("redis://127.0.0.1:6380/0") is None
    with pytest.raises(ValueError, match="not sentinel://host:port"):
        broker.parse_sentinels("sentinel://s1:26379;redis://x:1")


def test_describe_never_shows_a_password() -> None:
    assert "s3cret" not in broker.describe(Settings(redis_url="rediss://:s3cret@cache.example:6379/0"))
    assert "s3cret" not in broker.describe(Settings(redis_url="sentinel://:s3cret@s1:26379/0"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Redis:
    """A throwaway redis-server (or sentinel) on a free port, in ``root``."""

    def __init__(self, root: Path, *args: str, sentinel: bool = False) -> None:
        self.port = _free_port()
        root.mkdir(parents=True, exist_ok=True)
        argv = [find_redis_server()]
        if sentinel:
            conf = root / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\n" + "".join(f"{line}\n" for line in args))
            argv += [str(conf), "--sentinel"]
        else:
            argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(root), "--save", "", *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.client = redis.Redis(port=self.port, socket_timeout=2)
        wait_until(self._pings, 10, f"redis on :{self.port}")

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[_Redis, _Redis]]:
    """A primary that refuses writes without a replica (as compose.ha.yaml's), and its replica."""
    primary = _Redis(tmp_path / "primary", "--min-replicas-to-write", "1", "--min-replicas-max-lag", "2")
    replica = _Redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    try:
        wait_until(lambda: replica.client.info("replication")["master_link_status"] == "up", 10, "the replica")
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def _publish(settings: Settings, min_replicas: int, event: dict[str, Any] | None = None) -> list[str]:
    """One publish through the API's path (the enqueue script, then WAIT), on a client of its own. A 1 s wait,
    under the client's 2 s socket timeout: on a busy CI machine a healthy replica once took over 200 ms."""
    event = event or view()

    async def go() -> list[str]:
        client = broker.async_client(settings)
        try:
            marks = AsyncMarks(client, min_replicas=min_replicas, replica_timeout_ms=1000)
            msg = message.build([event], accepted_at=time.time(), request_ids=["t"])
            return await marks.enqueue(msg, [(event["event_id"], mark_value(event, time.time()))])
        finally:
            await broker.aclose(client)

    return asyncio.run(go())


def test_a_publish_waits_for_its_replica(pair: tuple[_Redis, _Redis]) -> None:
    primary, replica = pair
    settings = Settings(redis_url=f"redis://127.0.0.1:{primary.port}/0")
    assert _publish(settings, 1) == []
    assert replica.client.llen(keys.EVENTS_QUEUE) == 1  # confirmed means: on the replica already
    os.kill(replica.proc.pid, signal.SIGSTOP)  # frozen: connected, but it confirms nothing
    try:
        with pytest.raises(ReplicasUnconfirmed, match="0 of 1 required replicas"):
            _publish(settings, 1)
        # Without a replica required the same publish is answered at once: that is what WAIT adds.
        assert _publish(settings, 0) == []
        # Past min-replicas-max-lag the primary itself refuses: nothing is written at all.
        time.sleep(3.5)
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            _publish(settings, 1)
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)


def test_a_duplicate_is_answered_only_once_its_first_copy_is_confirmed(pair: tuple[_Redis, _Redis]) -> None:
    """A re-post finds the first copy's mark and writes nothing new; it is still answered only once a replica
    confirms (the enqueue script's probe write gives WAIT an offset to wait for on any Redis version)."""
    primary, replica = pair
    settings = Settings(redis_url=f"redis://127.0.0.1:{primary.port}/0")
    event = view()
    assert _publish(settings, 1, event) == []
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ReplicasUnconfirmed):
            _publish(settings, 1, event)
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    assert _publish(settings, 1, event) == ["d"]


def test_clients_find_the_primary_through_sentinel(pair: tuple[_Redis, _Redis], tmp_path: Path) -> None:
    primary, _ = pair
    sentinel = _Redis(tmp_path / "sentinel", f"sentinel monitor sluice 127.0.0.1 {primary.port} 1", sentinel=True)
    try:
        settings = Settings(redis_url=f"sentinel://127.0.0.1:{sentinel.port}/0", redis_sentinel_master="sluice")
        client = broker.sync_client(settings)
        try:
            client.set("sluice:test:through-sentinel", "1")
            assert primary.client.get("sluice:test:through-sentinel") == b"1"
        finally:
            broker.close(client)
        assert _publish(settings, 1) == []
    finally:
        sentinel.stop()

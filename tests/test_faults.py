"""Faults injected with real signals into real processes, under steady load; nothing acknowledged is lost.

Each test runs its own API and workers on a Redis database of its own (so no other test's worker takes its
messages), records every request (ok / failed / unknown), injects the fault, lets the system settle, and
checks the history against Cassandra: every ok event stored once, nothing stored that was refused.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from cassandra.cluster import Session

from devstack import Profile, Servers
from loadtests.checker import Checker
from loadtests.workload import NOT_SENT
from sluice import keys
from tests.history import SteadyLoad, check
from tests.support import AUTH, Service, start_api, start_worker, view, wait_until

pytestmark = pytest.mark.timeout(300)


class Rig:
    """API and workers of one fault test, on Redis database ``db``."""

    def __init__(self, profile: Profile, log_dir: Path, db: int, name: str) -> None:
        self.profile = profile
        self.log_dir = log_dir
        self.name = name
        self.redis_url = f"redis://127.0.0.1:{profile.redis_port}/{db}"
        self.port = profile.api_port + 10 + db
        self.services: list[Service] = []
        self.redis = redis.Redis.from_url(self.redis_url)
        self.redis.delete(keys.EVENTS_QUEUE, keys.UNACKED, keys.UNACKED_INDEX, keys.DEAD_LETTERS)

    def api(self, **env: str) -> Service:
        service = start_api(self.profile, self.log_dir, name=f"{self.name}-api", SLUICE_API_PORT=str(self.port),
                            SLUICE_REDIS_URL=self.redis_url, **env)  # fmt: skip
        self.services.append(service)
        return service

    def worker(self, suffix: str = "", **env: str) -> Service:
        service = start_worker(self.profile, self.log_dir, name=f"{self.name}-worker{suffix}",
                               SLUICE_REDIS_URL=self.redis_url, **env)  # fmt: skip
        self.services.append(service)
        return service

    def redis_answers(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def unacked(self) -> int:
        return int(self.redis.hlen(keys.UNACKED))

    def freeze_holding_a_message(self, worker: Service) -> None:
        """SIGSTOP the worker's process group at a moment it holds an unacknowledged message (a task is
        fast, so catch it: stop, look, and let it go on if it was idle)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.unacked() > 0:
                os.killpg(worker.proc.pid, signal.SIGSTOP)
                time.sleep(0.05)  # an acknowledgement already on the wire lands now
                if self.unacked() > 0:
                    return
                os.killpg(worker.proc.pid, signal.SIGCONT)
            time.sleep(0.002)
        raise AssertionError("the worker never held a message")

    def close(self) -> None:
        for service in self.services:
            service.stop()
        self.redis.close()


@pytest.fixture
def rig(request: pytest.FixtureRequest, cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Rig]:
    """A rig on the Redis database the test names with ``@pytest.mark.redis_db(N)``."""
    marker = request.node.get_closest_marker("redis_db")
    assert marker is not None, "fault tests name their own Redis database"
    r = Rig(profile, log_dir, marker.args[0], request.node.name.removeprefix("test_"))
    yield r
    r.close()


@pytest.mark.redis_db(3)
def test_worker_killed_mid_batch(rig: Rig, cassandra: Session) -> None:
    api = rig.api()
    doomed = rig.worker("-doomed")
    with SteadyLoad(api.base_url, rate=150) as load:
        time.sleep(2)
        # Kill the whole worker (main process and pool children) while it holds a message unacknowledged.
        rig.freeze_holding_a_message(doomed)
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait()
        assert rig.unacked() > 0, "the killed worker's message should still be unacknowledged in Redis"
        time.sleep(2)
        rig.worker("-heir")
        time.sleep(3)
    try:
        summary = check(load.history, cassandra, settle_s=90, api_url=api.base_url)
    except AssertionError as exc:
        state = {k.decode(): rig.redis.type(k).decode() for k in rig.redis.keys("*") if b"queued:" not in k}
        sample = sorted(load.history.ok)[0]
        total = cassandra.execute("SELECT count(*) FROM events_by_id").one()[0]
        one = cassandra.execute(f"SELECT event_id, listing_id FROM events_by_id WHERE event_id = {sample}").all()
        raise AssertionError(
            f"{exc}; ok={len(load.history.ok)} queue={rig.redis.llen(keys.EVENTS_QUEUE)} unacked={rig.unacked()} "
            f"keys={state} total_rows={total} sample={sample} -> {one} keyspace={cassandra.keyspace}"
        ) from None
    assert summary["failed"] == 0
    # The killed worker's messages are handed out again once their visibility timeout (20 s here) passes,
    # and acknowledged: when their events were written before the kill, the check above is done sooner.
    deadline = time.monotonic() + 60
    while rig.unacked() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rig.unacked() == 0


@pytest.mark.redis_db(4)
def test_cassandra_stopped_for_30_seconds(rig: Rig, servers: Servers, cassandra: Session) -> None:
    api = rig.api()
    worker = rig.worker(SLUICE_CASSANDRA_REQUEST_TIMEOUT_S="2", SLUICE_TASK_MAX_RETRIES="30")
    assert servers.cassandra is not None
    with SteadyLoad(api.base_url, rate=100) as load:
        time.sleep(2)
        servers.cassandra.signal(signal.SIGSTOP)
        try:
            ok_before = load.history.outcomes["202"]
            time.sleep(30)
            ok_while_down = load.history.outcomes["202"] - ok_before
        finally:
            servers.cassandra.signal(signal.SIGCONT)
        time.sleep(2)
    summary = check(load.history, cassandra, settle_s=120, api_url=api.base_url)
    # The API kept taking events while Cassandra was away: the queue was well under its limit. (The rate
    # is what this shared machine's load generator reaches; the point is that none was refused.)
    assert summary["failed"] == 0, load.history.outcomes
    assert ok_while_down >= 600, ok_while_down
    log = worker.log_text()
    attempts = [int(n) for n in re.findall(r"\(attempt (\d+)\), retrying in", log)]
    # Retries back off: each message's retries double their wait (1, 2, 4, ... s), so in 30 s none gets far;
    # a hot loop would take a message through its 30 attempts in seconds. (How many retries there are in all
    # follows the messages waiting: a worker run retries each of its messages on its own.)
    assert attempts, "no write was retried"
    assert max(attempts) <= 10, sorted(attempts)[-10:]
    assert rig.redis.hlen(keys.DEAD_LETTERS) == 0


@pytest.mark.redis_db(5)
def test_redis_restarted(rig: Rig, servers: Servers, cassandra: Session) -> None:
    api = rig.api()
    rig.worker()
    assert servers.redis is not None
    with SteadyLoad(api.base_url, rate=100, timeout=5) as load:
        time.sleep(3)
        acknowledged_before = set(load.history.ledger.accepted)
        servers.redis.signal(signal.SIGKILL)  # a crash, not a clean shutdown
        servers.redis.proc.wait()  # type: ignore[union-attr]
        # Acknowledged but not yet written when Redis died: only the AOF can bring these back.
        at_risk = acknowledged_before - Checker(session=cassandra).present_by_id(list(acknowledged_before))
        killed_at = time.monotonic()
        time.sleep(0.5)
        # Probe from a client of its own (the load's pool queues requests, which would time the client, not
        # the API): while Redis is away every answer is a fast 503 with Retry-After, never a hang.
        probes = []
        with httpx.Client(base_url=api.base_url, headers=AUTH, timeout=5) as probe:
            for _ in range(5):
                began = time.monotonic()
                answer = probe.post("/v1/events", json=view())
                probes.append((answer.status_code, answer.headers.get("retry-after"), time.monotonic() - began))
                time.sleep(0.3)
        time.sleep(1)
        servers.redis.start()
        wait_until(rig.redis_answers, 10, "Redis to answer again")
        restarted_at = time.monotonic()
        # The API recovers by itself: fresh requests are acknowledged again.
        ok_before = load.history.outcomes["202"]
        wait_until(lambda: load.history.outcomes["202"] > ok_before + 50, 15, "the API to accept events again")
        time.sleep(2)
    history = load.history
    summary = check(history, cassandra, settle_s=90, api_url=api.base_url)
    # What Redis had acknowledged before it was killed was still there after the restart (AOF) and got
    # stored: check() proved every acknowledged event is stored; these are the ones the kill could have lost.
    assert acknowledged_before, "nothing was acknowledged before Redis was killed"
    survived = Checker(session=cassandra).present_by_id(list(at_risk))
    assert survived == at_risk, f"{len(at_risk - survived)} of {len(at_risk)} queued at the kill were lost"
    # While Redis was away the API answered 503 with Retry-After, fast, never hanging.
    during = [f for f in history.failed.values() if killed_at - 0.5 <= f.sent_at - 0 <= restarted_at]
    assert during, f"no request was refused while Redis was down: {history.outcomes}"
    assert all(f.status == 503 and f.retry_after for f in during), {(f.status, f.code) for f in during}
    assert all(status == 503 and retry_after for status, retry_after, _ in probes), probes
    assert max(seconds for _, _, seconds in probes) < 1.0, probes
    assert summary["ok"] > len(acknowledged_before)


@pytest.mark.redis_db(6)
def test_api_sigterm(rig: Rig, cassandra: Session) -> None:
    api = rig.api()
    rig.worker()
    with SteadyLoad(api.base_url, rate=200) as load:
        time.sleep(3)
        api.proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: it exits "killed by SIGTERM", on purpose.
        assert api.proc.wait(30) in (0, -signal.SIGTERM)
        # A request that met the closing of its keep-alive connection has an unknown outcome; a new API lets
        # the client retry it (same id, same body) and learn the answer.
        time.sleep(1)
        stopped, api = api, rig.api()
        time.sleep(2)
    history = load.history
    summary = check(history, cassandra, settle_s=60, api_url=api.base_url)
    assert summary["ok"] >= 50
    # Requests after the API stopped were refused at connect (failed), never half-answered.
    # (A connect timeout or a full client pool also means the request never reached the API.)
    assert all(f.code in NOT_SENT or f.status == 503 for f in history.failed.values()), {
        (f.status, f.code) for f in history.failed.values()
    }
    log = stopped.log_text()  # what the stopped API wrote (the new one appends to the same file)
    assert "API shutting down: publishing what is queued" in log
    assert "Application shutdown complete" in log


@pytest.mark.redis_db(7)
def test_worker_sigterm(rig: Rig, cassandra: Session) -> None:
    api = rig.api()
    first = rig.worker("-first")
    with SteadyLoad(api.base_url, rate=150) as load:
        time.sleep(2)
        rig.freeze_holding_a_message(first)
        # SIGTERM lands while a task is in flight: the worker wakes to a warm shutdown mid-batch.
        first.proc.send_signal(signal.SIGTERM)
        os.killpg(first.proc.pid, signal.SIGCONT)
        assert first.proc.wait(90) == 0, "warm shutdown should finish the batch and exit cleanly"
        log = first.log_text()
        assert "Warm shutdown" in log
        # The message it held when SIGTERM came was finished (a batch being written) or handed back to the
        # queue (one received but not started): never dropped. check() below proves both.
        after = log.split("Warm shutdown", 1)[1]
        assert "wrote " in after or "Restoring 1 unacknowledged message" in after, after[-2000:]
        time.sleep(1)
        rig.worker("-second")
        time.sleep(2)
    summary = check(load.history, cassandra, settle_s=60, api_url=api.base_url)
    assert summary["failed"] == 0
    assert rig.unacked() == 0

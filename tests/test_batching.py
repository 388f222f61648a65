"""A worker writes the messages that wait for it in few runs (worker/batching.py), and loses none when a run
is lost: one pool process killed mid-run hands its messages back to the queue."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cassandra.cluster import Session

from devstack import Profile, Servers
from loadtests.procs import children_of as children
from sluice import keys, message
from sluice.events import EVENT_ADAPTER, queued_form
from sluice.marks import Marks, mark_value
from tests.support import Service, flushed_db, start_worker, view, wait_until
from worker import delivery
from worker.batching import Batcher
from worker.tasks import run_batch

pytestmark = pytest.mark.timeout(180)

DB = 15
MESSAGES = 60


@pytest.fixture
def db(profile: Profile) -> Iterator[redis.Redis]:
    yield from flushed_db(profile, DB)


def enqueue(db: redis.Redis, count: int) -> list[str]:
    """``count`` messages of one event each, published as the API publishes them (message and mark together)."""
    ids = []
    marks = Marks(db)
    for _ in range(count):
        event = queued_form(EVENT_ADAPTER.validate_python(view()))
        accepted_at = time.time()
        marks.enqueue(
            message.build([event], accepted_at=accepted_at, request_ids=["batching"]),
            [(event["event_id"], mark_value(event, accepted_at, "f" * 16))],
        )
        ids.append(event["event_id"])
    return ids


def worker(profile: Profile, log_dir: Path, name: str, **env: str) -> Service:
    return start_worker(profile, log_dir, name=name, SLUICE_REDIS_URL=f"redis://127.0.0.1:{profile.redis_port}/{DB}",
                        **env)  # fmt: skip


def stored(cassandra: Session, ids: list[str]) -> int:
    rows = cassandra.execute(f"SELECT event_id FROM events_by_id WHERE event_id IN ({','.join(ids)})")
    return len(list(rows))


def runs(service: Service) -> list[dict[str, Any]]:
    """The worker's log lines of its runs (one per run: the events and the messages it wrote)."""
    lines = [json.loads(line) for line in service.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if str(line.get("message", "")).startswith("wrote ")]


def exec_calls(db: redis.Redis) -> int:
    """Transactions (MULTI/EXEC) the Redis server has run so far, all clients and databases."""
    stats: dict[str, Any] = db.info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


def settled(db: redis.Redis) -> bool:
    return db.llen(keys.EVENTS_QUEUE) == 0 and db.hlen(keys.UNACKED) == 0


def test_waiting_messages_are_written_together(
    db: redis.Redis, profile: Profile, log_dir: Path, cassandra: Session
) -> None:
    ids = enqueue(db, MESSAGES)  # waiting before the worker starts, as after a burst
    service = worker(profile, log_dir, "batching-worker")
    try:
        wait_until(lambda: len(children(service.proc.pid)) >= 2, 30, "the worker's pool processes")
        transactions = exec_calls(db)
        wait_until(lambda: stored(cassandra, ids) == MESSAGES, 60, "every event stored")
        wait_until(lambda: settled(db), 30, "every message acknowledged")
        transactions = exec_calls(db) - transactions
        # A lone message is acknowledged as soon as its run ends, not at the hub's next poll (up to a second
        # on an idle worker): the time from stored to acknowledged, for a few in turn.
        delays = []
        for _ in range(5):
            [lone] = enqueue(db, 1)
            wait_until(lambda lone=lone: stored(cassandra, [lone]) == 1, 30, "the lone event stored")
            seen = time.monotonic()
            wait_until(lambda: db.hlen(keys.UNACKED) == 0, 10, "the lone message acknowledged", every=0.01)
            delays.append(time.monotonic() - seen)
        done = runs(service)
        taken = [len(line["task_ids"]) for line in done]
    finally:
        service.stop()
    assert sum(taken) == MESSAGES + 5, taken
    assert sorted(delays)[2] < 0.25, f"acknowledged {delays} s after being stored"
    # One message per run would be 60 runs; two pool processes take what waits while they write.
    assert len(taken) <= MESSAGES // 4, f"{len(taken)} runs for {MESSAGES} waiting messages: {taken}"
    assert max(taken) > 1, taken
    # A run's acks go to Redis together (worker/transport.py, ClaimingQoS.ack): one MULTI/EXEC per run, not one
    # per message, as Celery's acks (each its own call on the hub) would make.
    assert transactions <= len(taken) + 2, f"{transactions} transactions for {len(taken)} runs: {taken}"
    assert not db.hlen(keys.DEAD_LETTERS)


def test_a_lost_run_hands_its_messages_back(
    db: redis.Redis, profile: Profile, log_dir: Path, cassandra: Session, servers: Servers
) -> None:
    """Cassandra frozen, so the runs hang; one pool process is killed mid-run: its messages go back to the
    queue (not held by the worker until it restarts) and are written once Cassandra is back."""
    service = worker(profile, log_dir, "batching-lost", SLUICE_CASSANDRA_REQUEST_TIMEOUT_S="20")
    assert servers.cassandra is not None
    try:
        wait_until(lambda: len(children(service.proc.pid)) >= 2, 30, "the worker's pool processes")
        pool = children(service.proc.pid)
        ids = enqueue(db, 2)  # one run each, written at once
        wait_until(lambda: stored(cassandra, ids) == 2, 30, "the first events stored")
        servers.cassandra.signal(signal.SIGSTOP)
        try:
            ids += enqueue(db, MESSAGES)
            # Both processes hang in a run (Cassandra does not answer); the rest waits in the buffer.
            wait_until(lambda: db.llen(keys.EVENTS_QUEUE) == 0, 30, "the worker to take every message")
            time.sleep(1)
            os.kill(pool[0], signal.SIGKILL)
            time.sleep(1)
        finally:
            servers.cassandra.signal(signal.SIGCONT)
        wait_until(lambda: stored(cassandra, ids) == len(ids), 90, "every event stored")
        wait_until(lambda: settled(db), 60, "every message acknowledged, none held")
        log = service.log_text()
    finally:
        service.stop()
    assert "was lost" in log, log[-3000:]
    assert not db.hlen(keys.DEAD_LETTERS)


def test_a_lingering_worker_writes_a_lone_message_at_once_and_a_stream_in_few_runs(
    db: redis.Redis, profile: Profile, log_dir: Path, cassandra: Session
) -> None:
    """With a linger, the transport waits only when messages come more often than the linger: a lone message
    on a quiet worker is written at once; a stream is claimed and written in runs of many (without the linger,
    a worker with a free process writes each message of a slow stream alone)."""
    linger_s = 5.0
    service = worker(profile, log_dir, "batching-linger", SLUICE_WORKER_LINGER_MS=str(int(linger_s * 1000)))
    try:
        lone = enqueue(db, 1)
        began = time.monotonic()
        wait_until(lambda: stored(cassandra, lone) == 1, 30, "the lone event stored")
        assert time.monotonic() - began < linger_s - 1, "a quiet worker does not wait for company"
        stream: list[str] = []
        for _ in range(40):  # 20 messages/s: one every 50 ms, far more often than the linger
            stream += enqueue(db, 1)
            time.sleep(0.05)
        wait_until(lambda: stored(cassandra, stream) == len(stream), 60, "the stream stored")
        wait_until(lambda: settled(db), 30, "every message acknowledged")
        taken = [len(line["task_ids"]) for line in runs(service)]
    finally:
        service.stop()
    assert taken[0] == 1, taken
    assert sum(taken[1:]) == len(stream), taken
    assert len(taken[1:]) <= 4, f"{len(taken) - 1} runs for a stream of {len(stream)} messages: {taken}"


class _Request:
    """What the batcher reads of a Celery request, and what it does to one (acknowledge, reject)."""

    def __init__(self, events: int) -> None:
        self.id = f"task-{id(self)}"
        self.args = ([{"event_id": str(i)} for i in range(events)],)
        self.kwargs: dict[str, Any] = {}
        self.request_dict = {"retries": 0}
        self.fate = ""

    def acknowledge(self) -> None:
        self.fate = "acked"

    def reject(self, requeue: bool = False) -> None:
        self.fate = "requeued" if requeue else "dropped"


class _Pool:
    """Runs handed over, completed by the test."""

    def __init__(self) -> None:
        self.runs: list[tuple[list[Any], Any, Any]] = []

    def apply_async(self, target: Any, args: tuple[Any, ...], callback: Any, error_callback: Any, **_: Any) -> None:
        self.runs.append((args[0], callback, error_callback))


def test_a_busy_worker_gathers_what_arrives_into_its_next_run() -> None:
    pool = _Pool()
    batcher = Batcher(pool, run_batch, slots=1, max_messages=3, max_events=100, limits=(10, 20))
    first, *rest = [_Request(2) for _ in range(5)]
    batcher.put(first)
    assert [len(jobs) for jobs, _, _ in pool.runs] == [1], "an idle worker runs a lone message at once"
    for request in rest:
        batcher.put(request)
    assert len(pool.runs) == 1, "no second run while the only process is busy"
    _, done, _ = pool.runs[0]
    done([True])
    assert first.fate == "acked"
    assert [len(jobs) for jobs, _, _ in pool.runs] == [1, 3], "the next run takes what waited, up to its bound"
    _, _, lost = pool.runs[1]
    lost("WorkerLostError")
    assert [r.fate for r in rest] == ["requeued"] * 3 + [""], "a lost run hands its messages back"
    assert [len(jobs) for jobs, _, _ in pool.runs] == [1, 3, 1]
    _, done, _ = pool.runs[2]
    done([False])
    assert rest[-1].fate == "requeued", "a message its run could not settle goes back to the queue"


def test_messages_delivered_under_a_hold_leave_in_one_run() -> None:
    """What the transport relies on (worker/delivery.py): a claim's messages are buffered while it holds runs
    and leave together when it lets go."""
    pool = _Pool()
    batcher = Batcher(pool, run_batch, slots=2, max_messages=3, max_events=100, limits=(10, 20))
    with delivery.runs_held():
        for _ in range(4):
            batcher.put(_Request(1))
        assert not pool.runs, "nothing leaves while the transport holds runs"
    assert [len(jobs) for jobs, _, _ in pool.runs] == [3, 1], "released: full runs, while processes are free"
    # A linger's hold ends by itself at its deadline, even if nothing releases it (a consumer restarted on a
    # lost connection drops the timer that would): later runs are never kept from the pool.
    delivery.hold_until(time.monotonic() + 0.05)
    batcher.put(_Request(1))
    assert len(pool.runs) == 2, "held"
    time.sleep(0.06)
    assert not delivery.held()
    pool.runs[0][1]([True, True, True])  # a run ends: the batcher flushes
    assert [len(jobs) for jobs, _, _ in pool.runs] == [3, 1, 1]

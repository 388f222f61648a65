"""``sluice.client`` against the real stack (API, Redis, worker, Cassandra as real processes), and, for the
HTTP edge cases a real API will not produce on demand (an HTTP-date ``Retry-After``, a 413), against an
``httpx.MockTransport`` injected through ``transport=``.

What must hold: every event ``send`` took is answered exactly once (accepted, or rejected with the API's
reason); retries resend the same bytes (same ids, same content); ``Retry-After`` is waited out; nothing the
client reported accepted is lost or stored twice, even when Redis is killed mid-stream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import gzip
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import orjson
import pytest
import redis
from cassandra.cluster import Session

from devstack import Profile, Servers
from loadtests.checker import Checker, Ledger
from sluice import keys
from sluice.client import AsyncClient, Client, FlushResult, QueueFull, Rejection, RetryPolicy, booking, view
from sluice.client._events import prepare
from sluice.client._retry import parse_retry_after
from sluice.events import ViewEvent
from tests.support import TEST_KEY, Service, start_api, start_worker, wait_until

# --- helpers ----------------------------------------------------------------------------------------------


def listings(count: int = 1) -> list[int]:
    """Listing ids unique to one test, so the checker's partition scans see only its events."""
    base = random.randrange(10**12, 10**15)
    return [base + n for n in range(count)]


def record(ledger: Ledger, sent: dict[UUID, dict[str, Any]], result: FlushResult) -> None:
    """What the client reported, in the checker's terms: accepted, refused, or unknown (may be queued)."""
    for eid in result.accepted:
        ledger.record(sent[eid], "accepted")
    for rejection in result.rejected:
        ledger.record(sent[rejection.event_id], "unknown" if rejection.outcome_unknown else "refused")


def assert_stored_exactly_once(session: Session, ledger: Ledger, settle_s: float = 120) -> None:
    checker = Checker(session=session)
    missing = checker.wait_stored(list(ledger.accepted), settle_s)
    report = checker.check(ledger)
    assert missing == 0, f"{missing} accepted events never stored; {report.line()}"
    assert report.ok, f"{report.line()}; {dict(report.details)}"


class Recording(httpx.BaseTransport):
    """The real network, with every exchange noted: (sent at, answered at, status, Retry-After, body).
    Injected, not patched: the client under test is the one producers get."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.exchanges: list[tuple[float, float, int | None, str | None, bytes]] = []
        self.lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        sent_at = time.monotonic()
        try:
            response = self.inner.handle_request(request)
            response.read()
        except httpx.TransportError:
            with self.lock:
                self.exchanges.append((sent_at, time.monotonic(), None, None, body))
            raise
        with self.lock:
            self.exchanges.append(
                (sent_at, time.monotonic(), response.status_code, response.headers.get("retry-after"), body)
            )
        return response

    def close(self) -> None:
        self.inner.close()

    def statuses(self) -> list[int | None]:
        return [status for _, _, status, _, _ in self.exchanges]


def ids_in(body: bytes) -> list[str]:
    return [event["event_id"] for event in orjson.loads(gzip.decompress(body))["events"]]


# --- the import surface -----------------------------------------------------------------------------------


def test_the_client_imports_without_the_servers_libraries() -> None:
    # A producer installs httpx and orjson, not Celery, Redis, Cassandra's driver or pydantic; and the folder
    # imports nothing else of Sluice, so it can be vendored on its own.
    code = (
        "import sys, sluice.client; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('celery', 'kombu', 'redis', 'cassandra', 'pydantic', 'fastapi', 'starlette') "
        "or (m.startswith('sluice.') and not m.startswith('sluice.client'))); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_helpers_build_contract_v1_events() -> None:
    when = dt.datetime(2026, 11, 25, 9, 30, tzinfo=dt.UTC)
    assert view(listing_id=1, user_id=2, occurred_at=when) == {
        "type": "view", "listing_id": 1, "user_id": 2, "occurred_at": "2026-11-25T09:30:00+00:00"
    }  # fmt: skip
    event = booking(listing_id=1, user_id=2, check_in=dt.date(2026, 12, 1), check_out="2026-12-04", guests=2,
                    total_price="449.70", currency="EUR", occurred_at=when)  # fmt: skip
    assert event["check_in"] == "2026-12-01"
    assert event["total_price"] == "449.70"
    # The API's own model is taken as it is (tests may import pydantic; producers need not).
    model = ViewEvent.model_validate({"event_id": str(uuid.uuid4()), "type": "view", "listing_id": 1, "user_id": 2,
                                      "occurred_at": "2026-11-25T09:30:00Z"})  # fmt: skip
    eid, data, encoded = prepare(model)
    assert eid == model.event_id
    assert orjson.loads(encoded) == data == model.model_dump(mode="json")
    with pytest.raises(ValueError, match="timezone-aware"):
        view(listing_id=1, user_id=2, occurred_at=dt.datetime(2026, 1, 1))
    with pytest.raises(TypeError, match="float"):
        booking(listing_id=1, user_id=2, check_in="2026-12-01", check_out="2026-12-04", guests=2,
                total_price=449.7, currency="EUR")  # type: ignore[arg-type]  # fmt: skip


# --- HTTP edge cases, on an injected MockTransport --------------------------------------------------------


def accept_all(request: httpx.Request) -> httpx.Response:
    events = orjson.loads(gzip.decompress(request.content))["events"]
    results = [
        {"index": i, "event_id": e["event_id"], "status": "accepted", "errors": []} for i, e in enumerate(events)
    ]
    return httpx.Response(202, json={"accepted": len(events), "rejected": 0, "results": results})


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after("Mon, 30 Nov 2026 12:00:05 GMT", now) == 5.0
    assert parse_retry_after("Mon, 30 Nov 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_an_http_date_retry_after_is_waited_out_and_the_same_bytes_resent() -> None:
    bodies: list[bytes] = []
    slept: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            when = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), usegmt=True)
            return httpx.Response(503, headers={"Retry-After": when},
                                  json={"error": {"code": "queue_full", "message": "full", "details": []}})  # fmt: skip
        return accept_all(request)

    with Client("http://sluice.test", TEST_KEY, transport=httpx.MockTransport(handler), sleep=slept.append) as c:
        ids = [c.send(view(listing_id=1, user_id=n + 1)) for n in range(3)]
        result = c.flush()
    assert result.accepted == ids
    assert not result.rejected
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]
    # 30 s away as an HTTP-date (whole seconds, so 29 s after rounding), plus at most 1 s of jitter.
    assert len(slept) == 1, slept
    assert 29 <= slept[0] <= 31, slept


def test_a_413_splits_the_batch_and_an_event_too_large_alone_is_rejected() -> None:
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        events = orjson.loads(gzip.decompress(request.content))["events"]
        sizes.append(len(events))
        if len(events) > 2 or any(e["user_id"] == 666 for e in events):
            return httpx.Response(413, json={"error": {"code": "payload_too_large", "message": "big", "details": []}})
        return accept_all(request)

    with Client("http://sluice.test", TEST_KEY, transport=httpx.MockTransport(handler)) as c:
        ids = [c.send(view(listing_id=1, user_id=n + 1)) for n in range(5)]
        huge = c.send(view(listing_id=1, user_id=666))
        result = c.flush()
    assert sorted(result.accepted) == sorted(ids)
    assert [(r.event_id, r.status, r.code) for r in result.rejected] == [(huge, 413, "payload_too_large")]
    assert sizes[0] == 6
    assert sum(s for s in sizes if s <= 2) >= 5


@pytest.mark.parametrize(
    ("error", "unknown"),
    [(httpx.ConnectError("refused"), False), (httpx.ReadTimeout("slow"), True)],
)
def test_giving_up_reports_every_event_with_the_reason(error: Exception, unknown: bool) -> None:
    attempts: list[bytes] = []
    reported: list[tuple[Rejection | QueueFull, list[dict[str, Any]]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request.content)
        raise error

    retry = RetryPolicy(max_attempts=4, backoff_base_s=0.001)
    with Client("http://sluice.test", TEST_KEY, transport=httpx.MockTransport(handler), retry=retry,
                on_error=lambda err, events: reported.append((err, events))) as c:  # fmt: skip
        ids = [c.send(view(listing_id=1, user_id=n + 1)) for n in range(3)]
        result = c.flush()
    assert len(attempts) == 4
    assert len(set(attempts)) == 1, "every attempt resends the same bytes"
    assert not result.accepted
    assert [r.event_id for r in result.rejected] == ids
    assert {(r.code, r.status, r.outcome_unknown) for r in result.rejected} == {("gave_up", None, unknown)}
    assert "4 attempts" in result.rejected[0].message
    assert [events[0]["event_id"] for _, events in reported] == [str(i) for i in ids]


def test_batches_are_cut_by_count_by_bytes_and_by_time() -> None:
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sizes.append(len(orjson.loads(gzip.decompress(request.content))["events"]))
        return accept_all(request)

    transport = httpx.MockTransport(handler)
    with Client("http://sluice.test", TEST_KEY, transport=transport, max_batch_events=10, linger_s=60) as c:
        for n in range(25):
            c.send(view(listing_id=1, user_id=n + 1))
        assert len(c.flush().accepted) == 25
    assert sizes == [10, 10, 5]  # two full batches at once, the rest on flush (the linger is a minute)

    sizes.clear()
    one = len(orjson.dumps(view(listing_id=1, user_id=1) | {"event_id": str(uuid.uuid4())}))
    with Client(
        "http://sluice.test", TEST_KEY, transport=transport, max_batch_bytes=max(1024, 4 * one), linger_s=60
    ) as c:
        for n in range(int(1024 / one) * 3):
            c.send(view(listing_id=1, user_id=n + 1))
        c.flush()
    assert len(sizes) >= 3, sizes
    assert all(size * (one + 1) + 13 <= max(1024, 4 * one) for size in sizes), sizes

    sizes.clear()
    with Client("http://sluice.test", TEST_KEY, transport=transport, linger_s=0.2) as c:
        c.send(view(listing_id=1, user_id=1))
        wait_until(lambda: sizes == [1], 5, "the lingering event to go without a flush")


def test_a_rejection_handler_that_raises_does_not_stop_the_client() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "no", "details": []}})

    def explode(*_: Any) -> None:
        raise RuntimeError("the producer's bug")

    with Client("http://sluice.test", TEST_KEY, transport=httpx.MockTransport(handler), on_error=explode) as c:
        c.send(view(listing_id=1, user_id=1))
        first = c.flush()
        c.send(view(listing_id=1, user_id=2))
        second = c.flush()
    assert [(r.status, r.code) for r in first.rejected + second.rejected] == [(401, "unauthorized")] * 2


def test_async_queue_policies_and_on_error() -> None:
    # The API is held (the handler waits for a gate), so the client's queue fills and stays full.
    reported: list[tuple[Rejection | QueueFull, list[dict[str, Any]]]] = []

    async def run() -> None:
        gate = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            await gate.wait()
            return accept_all(request)

        def client(**options: Any) -> AsyncClient:
            return AsyncClient("http://sluice.test", TEST_KEY, transport=httpx.MockTransport(handler),
                               max_batch_events=5, max_queued_events=10, linger_s=0, **options)  # fmt: skip

        async with client(when_full="raise") as c:
            taken = [await c.send(view(listing_id=1, user_id=n + 1)) for n in range(10)]
            with pytest.raises(QueueFull):
                await c.send(view(listing_id=1, user_id=11))
            gate.set()
            assert sorted((await c.flush()).accepted) == sorted(taken)
        gate.clear()

        async with client(when_full="drop_new", on_error=lambda err, events: reported.append((err, events))) as c:
            ids = [await c.send(view(listing_id=1, user_id=n + 1)) for n in range(15)]
            gate.set()
            result = await c.flush()
        assert sorted(result.accepted) == sorted(ids[:10])
        assert [(r.event_id, r.code) for r in result.rejected] == [(eid, "dropped") for eid in ids[10:]]
        assert [UUID(events[0]["event_id"]) for _, events in reported] == ids[10:]
        gate.clear()

        async with client(block_timeout_s=0.2) as c:
            for n in range(10):
                await c.send(view(listing_id=1, user_id=n + 1))
            began = time.monotonic()
            with pytest.raises(QueueFull, match=r"after 0\.2 s"):
                await c.send(view(listing_id=1, user_id=11))
            assert time.monotonic() - began >= 0.2
            # Room comes back as the API answers: a blocked send then goes through.
            later = asyncio.get_running_loop().call_later(0.1, gate.set)
            await c.send(view(listing_id=1, user_id=12))
            later.cancel()
            assert len((await c.flush()).accepted) == 11

    asyncio.run(run())


# --- the real stack ---------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_ten_thousand_events_are_each_stored_once(api: Service, worker: Service, cassandra: Session) -> None:
    shelf = listings(20)
    sent: dict[UUID, dict[str, Any]] = {}
    with Client(api.base_url, TEST_KEY) as client:
        for n in range(10_000):
            event = (
                booking(listing_id=shelf[n % 20], user_id=n + 1, check_in="2026-12-01", check_out="2026-12-04",
                        guests=2, total_price="449.70", currency="EUR")
                if n % 10 == 0 else view(listing_id=shelf[n % 20], user_id=n + 1)
            )  # fmt: skip
            sent[client.send(event)] = event
        result = client.flush()
    assert not result.rejected, result.rejected[:3]
    assert len(result.accepted) == 10_000
    assert set(result.accepted) == set(sent)
    ledger = Ledger()
    record(ledger, {eid: event | {"event_id": str(eid)} for eid, event in sent.items()}, result)
    assert_stored_exactly_once(cassandra, ledger)


def test_rejections_carry_the_apis_reasons(isolated_api: Service, isolated_queue: redis.Redis) -> None:
    # No worker consumes the isolated API's queue: the first version stays queued, so the second is a 409.
    [listing] = listings()
    first = view(listing_id=listing, user_id=1, event_id=uuid.uuid4())
    with Client(isolated_api.base_url, TEST_KEY) as client:
        client.send(first)
        assert client.flush().accepted == [UUID(first["event_id"])]

        # One batch: a conflicting second version, an invalid booking and a good event (202, judged per event).
        conflicting = client.send(first | {"user_id": 2})
        invalid = client.send(booking(listing_id=listing, user_id=3, check_in="2026-12-01", check_out="2026-12-04",
                                      guests=0, total_price="1.00", currency="EUR"))  # fmt: skip
        good = client.send(view(listing_id=listing, user_id=4))
        mixed = client.flush()

        # A batch with no event queued (the API answers 409 for all of it): still judged per event.
        again = client.send(first | {"user_id": 5})
        strict = client.send(view(listing_id=listing, user_id=6) | {"listing_id": "5"})
        refused = client.flush()
    assert mixed.accepted == [good]
    by_id = {r.event_id: r for r in mixed.rejected}
    assert (by_id[conflicting].status, by_id[conflicting].code) == (409, "conflict")
    assert by_id[conflicting].loc == ["events", 0, "event_id"]
    assert (by_id[invalid].status, by_id[invalid].code, by_id[invalid].loc) == (422, "invalid_event",
                                                                                ["events", 1, "guests"])  # fmt: skip
    assert "guests" in by_id[invalid].message
    assert not refused.accepted
    assert {(r.event_id, r.status, r.code) for r in refused.rejected} == {
        (again, 409, "conflict"), (strict, 422, "invalid_event")
    }  # fmt: skip
    assert not any(r.outcome_unknown for r in mixed.rejected + refused.rejected)


def test_leaving_the_block_flushes_and_close_is_idempotent(isolated_api: Service, isolated_queue: redis.Redis) -> None:
    [listing] = listings()
    with Client(isolated_api.base_url, TEST_KEY, linger_s=60) as client:
        ids = [client.send(view(listing_id=listing, user_id=n + 1)) for n in range(50)]
    # Exiting flushed: every event is queued now, although the linger was a minute.
    with httpx.Client(base_url=isolated_api.base_url, headers={"Authorization": f"Bearer {TEST_KEY}"}) as http:
        statuses = {http.get(f"/v1/events/{eid}").json()["status"] for eid in ids}
    assert statuses == {"queued"}
    assert client.close() == FlushResult()
    with pytest.raises(Exception, match=r"after close"):
        client.send(view(listing_id=listing, user_id=1))


@pytest.mark.timeout(300)
def test_async_client(api: Service, worker: Service, cassandra: Session) -> None:
    shelf = listings(5)
    sent: dict[UUID, dict[str, Any]] = {}

    async def produce() -> tuple[FlushResult, FlushResult]:
        async with AsyncClient(api.base_url, TEST_KEY, max_batch_events=200) as client:
            for n in range(1500):
                event = view(listing_id=shelf[n % 5], user_id=n + 1)
                sent[await client.send(event)] = event
            first = await client.flush()
            for n in range(500):
                event = view(listing_id=shelf[n % 5], user_id=n + 1)
                sent[await client.send(event)] = event
            second = await client.flush()
        return first, second

    first, second = asyncio.run(produce())
    assert (len(first.accepted), len(second.accepted), first.rejected, second.rejected) == (1500, 500, [], [])
    ledger = Ledger()
    everything = FlushResult(first.accepted + second.accepted, [])
    record(ledger, {eid: event | {"event_id": str(eid)} for eid, event in sent.items()}, everything)
    assert_stored_exactly_once(cassandra, ledger)


# --- Retry-After and the queue's policies, on a rate-limited API -------------------------------------------

LIMITED_DB = 14


@pytest.fixture(scope="module")
def limited_api(cassandra: Session, profile: Profile, log_dir: Path) -> Iterator[Service]:
    """20 events per second per key, on a Redis database of its own where no worker consumes."""
    url = f"redis://127.0.0.1:{profile.redis_port}/{LIMITED_DB}"
    queue = redis.Redis.from_url(url)
    queue.flushdb()
    service = start_api(profile, log_dir, name="api-client-limited", SLUICE_API_PORT=str(profile.api_port + 31),
                        SLUICE_REDIS_URL=url, SLUICE_RATE_LIMIT_PER_S="20")  # fmt: skip
    yield service
    service.stop()
    queue.flushdb()
    queue.close()


def test_retry_after_is_waited_out_and_the_same_events_resent(limited_api: Service) -> None:
    [listing] = listings()
    transport = Recording()
    with Client(limited_api.base_url, TEST_KEY, transport=transport, max_batch_events=15, linger_s=0.01) as client:
        ids = [client.send(view(listing_id=listing, user_id=n + 1)) for n in range(60)]
        result = client.flush()
    assert sorted(result.accepted) == sorted(ids)
    assert not result.rejected
    exchanges = transport.exchanges
    limited = [i for i, (_, _, status, _, _) in enumerate(exchanges) if status == 429]
    assert limited, f"the API never answered 429: {transport.statuses()}"
    for i in limited:
        _, answered_at, _, retry_after, body = exchanges[i]
        assert retry_after is not None
        resent_at, _, _, _, resent = exchanges[i + 1]
        # The resend waited out Retry-After (whole seconds), and carried the same bytes: same ids, same content.
        assert resent_at - answered_at >= float(retry_after), (resent_at - answered_at, retry_after)
        assert resent == body
    assert sorted(UUID(eid) for _, _, status, _, body in exchanges if status == 202 for eid in ids_in(body)) == sorted(
        ids
    )


def fill(client: Client, listing: int, taken: list[UUID], count: int = 200) -> None:
    """Send ``count`` events in a tight loop: far more than 20 events/s can drain."""
    for n in range(count):
        taken.append(client.send(view(listing_id=listing, user_id=n + 1)))


def test_queue_full_policy_raise(limited_api: Service) -> None:
    [listing] = listings()
    with Client(limited_api.base_url, TEST_KEY, max_batch_events=10, max_queued_events=30, when_full="raise") as c:
        taken: list[UUID] = []
        with pytest.raises(QueueFull):
            fill(c, listing, taken)
        assert 30 <= len(taken) < 200
        result = c.flush()
    assert sorted(result.accepted) == sorted(taken)
    assert not result.rejected


def test_queue_full_policy_drop_new_reports_what_it_dropped(limited_api: Service) -> None:
    [listing] = listings()
    reported: list[tuple[Rejection | QueueFull, list[dict[str, Any]]]] = []
    with Client(limited_api.base_url, TEST_KEY, max_batch_events=10, max_queued_events=30, when_full="drop_new",
                on_error=lambda err, events: reported.append((err, events))) as c:  # fmt: skip
        ids = [c.send(view(listing_id=listing, user_id=n + 1)) for n in range(100)]
        result = c.flush()
    dropped = [r.event_id for r in result.rejected]
    assert dropped
    assert len(result.accepted) + len(dropped) == 100
    assert sorted(result.accepted + dropped) == sorted(ids)
    assert {(r.code, r.status) for r in result.rejected} == {("dropped", None)}
    assert all(isinstance(err, QueueFull) for err, _ in reported)
    assert [UUID(events[0]["event_id"]) for _, events in reported] == dropped


def test_queue_full_policy_block_waits_for_room_then_times_out(limited_api: Service) -> None:
    [listing] = listings()
    # Start at the top of a second: the third batch then meets the spent window (429, Retry-After: 1).
    time.sleep(1 - time.time() % 1)
    with Client(limited_api.base_url, TEST_KEY, max_batch_events=10, max_queued_events=20, block_timeout_s=10) as c:
        began = time.monotonic()
        ids = [c.send(view(listing_id=listing, user_id=n + 1)) for n in range(60)]
        # 60 events through a 20-event queue at 20 events/s: send blocked until the API took the first ones.
        assert time.monotonic() - began >= 1.0
        assert len(c.flush().accepted) == 60
    with Client(limited_api.base_url, TEST_KEY, max_batch_events=10, max_queued_events=20, block_timeout_s=0.3) as c:
        with pytest.raises(QueueFull, match=r"after 0\.3 s"):
            fill(c, listing, [])
        c.flush()
    assert len(set(ids)) == 60


# --- Redis killed and restarted while the client sends -----------------------------------------------------

RESTART_DB = 13


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.mark.timeout(400)
def test_redis_restarted_mid_stream(servers: Servers, cassandra: Session, profile: Profile, log_dir: Path) -> None:
    url = f"redis://127.0.0.1:{profile.redis_port}/{RESTART_DB}"
    queue = redis.Redis.from_url(url)
    queue.delete(keys.EVENTS_QUEUE, keys.UNACKED, keys.UNACKED_INDEX, keys.DEAD_LETTERS)
    api = start_api(profile, log_dir, name="api-client-restart", SLUICE_API_PORT=str(profile.api_port + 30),
                    SLUICE_REDIS_URL=url)  # fmt: skip
    worker = start_worker(profile, log_dir, name="worker-client-restart", SLUICE_REDIS_URL=url)
    assert servers.redis is not None
    shelf = listings(10)
    sent: dict[UUID, dict[str, Any]] = {}
    transport = Recording()
    stop = threading.Event()
    # Long enough to outlast the outage: a producer's events wait out Redis's absence, they are not dropped.
    retry = RetryPolicy(give_up_after_s=90, max_attempts=100, backoff_max_s=2)
    try:
        with Client(api.base_url, TEST_KEY, transport=transport, retry=retry, max_batch_events=100,
                    linger_s=0.05) as client:  # fmt: skip

            def produce() -> None:
                n = 0
                while not stop.is_set():
                    event = view(listing_id=shelf[n % 10], user_id=n + 1)
                    sent[client.send(event)] = event
                    n += 1
                    time.sleep(0.004)  # about 200 events/s, sent as batches

            producer = threading.Thread(target=produce)
            producer.start()
            try:
                time.sleep(3)
                servers.redis.signal(signal.SIGKILL)  # a crash, not a clean shutdown
                servers.redis.proc.wait()  # type: ignore[union-attr]
                killed_at = len(transport.exchanges)
                time.sleep(4)
                servers.redis.start()
                wait_until(lambda: answers(queue), 15, "Redis to answer again")
                time.sleep(4)
            finally:
                stop.set()
                producer.join()
            result = client.flush(timeout=120)
        refused_while_down = [s for _, _, s, _, _ in transport.exchanges[killed_at:] if s != 202]
        assert refused_while_down, f"no request was refused while Redis was down: {transport.statuses()}"
        # Nothing rejected, silently or not: every event waited out the outage and was accepted.
        assert not result.rejected, {(r.code, r.status, r.message) for r in result.rejected}
        assert sorted(result.accepted) == sorted(sent), (len(result.accepted), len(sent))
        # Every resend carried the same content under the same id.
        bodies: dict[str, bytes] = {}
        for *_, body in transport.exchanges:
            for event in orjson.loads(gzip.decompress(body))["events"]:
                assert bodies.setdefault(event["event_id"], orjson.dumps(event)) == orjson.dumps(event)
        ledger = Ledger()
        record(ledger, {eid: event | {"event_id": str(eid)} for eid, event in sent.items()}, result)
        assert_stored_exactly_once(cassandra, ledger)
    finally:
        worker.stop()
        api.stop()
        queue.close()


def test_the_shell_example_sends_a_file_of_events(
    isolated_api: Service, isolated_queue: redis.Redis, tmp_path: Path
) -> None:
    [listing] = listings()
    events = [view(listing_id=listing, user_id=n + 1) for n in range(2500)]
    bad = view(listing_id=listing, user_id=1, event_id=uuid.uuid4()) | {"user_id": "7"}
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(orjson.dumps(e) for e in [*events, bad]) + b"\n")
    script = Path(__file__).resolve().parent.parent / "examples" / "send-jsonl.sh"
    out = subprocess.run([str(script), str(tmp_path / "events.jsonl"), isolated_api.base_url], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "SLUICE_API_KEY": TEST_KEY})  # fmt: skip
    assert out.stdout.strip() == "2500 accepted, 1 rejected", out.stderr[-2000:]
    assert out.returncode == 1
    # The bad event is the 501st of the third batch: the API names it by its place in that batch.
    assert out.stderr.startswith(f"{bad['event_id']} 422 invalid_event events.500.user_id: "), out.stderr

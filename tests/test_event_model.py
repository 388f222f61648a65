"""The event contract (v1): what is valid, and the path of each field that is not."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest
from cassandra.query import UNSET_VALUE

from api.publisher import BatchingPublisher, EnqueueFn, Overloaded, PublishError
from sluice.cassandra import EVENT_COLUMNS
from sluice.events import EVENT_ADAPTER, BookingEvent, ViewEvent, queued_form, validate_event
from sluice.eventtypes import TYPE_FIELDS
from sluice.marks import NEW
from sluice.message import Message
from sluice.queue import make_celery
from sluice.settings import Settings
from tests.support import booking, view
from worker.writer import parse_queued


def errors_of(raw: Any) -> list[tuple[tuple[str | int, ...], str]]:
    outcome = validate_event(raw)
    assert isinstance(outcome, list), f"expected errors, got {outcome!r}"
    return [(tuple(e.loc), e.type) for e in outcome]


def test_valid_view_and_booking() -> None:
    assert isinstance(validate_event(view()), ViewEvent)
    stored = validate_event(booking())
    assert isinstance(stored, BookingEvent)
    assert stored.total_price == "449.70"
    assert stored.occurred_at.utcoffset() is not None


@pytest.mark.parametrize(
    ("field", "value", "error_type"),
    [
        ("listing_id", "5", "int_type"),
        ("listing_id", True, "int_type"),
        ("listing_id", 0, "greater_than"),
        ("listing_id", 2**63, "less_than_equal"),
        ("user_id", 1.5, "int_type"),
        ("event_id", "not-a-uuid", "uuid_parsing"),
        ("event_id", 12345, "value_error"),
        # Not RFC 3339 with an offset (our check, before pydantic's parser), and a date that does not exist.
        ("occurred_at", "2026-11-25T09:30:00", "value_error"),
        ("occurred_at", 1_764_000_000, "value_error"),
        ("occurred_at", "yesterday", "value_error"),
        ("occurred_at", "2026-02-30T09:30:00Z", "datetime_from_date_parsing"),
    ],
)
def test_strict_fields_on_a_view(field: str, value: Any, error_type: str) -> None:
    assert errors_of(view(**{field: value})) == [((field,), error_type)]


@pytest.mark.parametrize(
    ("field", "value", "error_type"),
    [
        ("guests", 0, "greater_than_equal"),
        ("guests", 51, "less_than_equal"),
        ("guests", "2", "int_type"),
        ("total_price", "-1.00", "string_pattern_mismatch"),
        ("total_price", 12.5, "string_type"),
        ("total_price", "1e3", "string_pattern_mismatch"),
        ("currency", "eur", "string_pattern_mismatch"),
        ("check_in", "2026-02-30", "date_from_datetime_parsing"),
    ],
)
def test_strict_fields_on_a_booking(field: str, value: Any, error_type: str) -> None:
    assert errors_of(booking(**{field: value})) == [((field,), error_type)]


def test_check_out_must_follow_check_in() -> None:
    problems = validate_event(booking(check_in="2026-12-04", check_out="2026-12-04"))
    assert isinstance(problems, list)
    assert problems[0].msg == "check_out must be after check_in"


def test_unknown_fields_and_booking_fields_on_a_view_are_refused() -> None:
    assert errors_of(view(colour="red")) == [(("colour",), "extra_forbidden")]
    assert errors_of(view(guests=2)) == [(("guests",), "extra_forbidden")]


def test_missing_fields_and_unknown_type() -> None:
    assert errors_of(booking(check_in=None) | {}) == [(("check_in",), "value_error")]
    raw = booking()
    del raw["currency"]
    assert errors_of(raw) == [(("currency",), "missing")]
    assert errors_of(view(type="click")) == [(("type",), "union_tag_invalid")]
    missing_type = view()
    del missing_type["type"]
    assert errors_of(missing_type) == [(("type",), "union_tag_not_found")]
    assert errors_of([1, 2]) == [((), "model_attributes_type")]


def test_paths_are_prefixed_for_batches() -> None:
    outcome = validate_event(view(user_id="7"), ("events", 3))
    assert isinstance(outcome, list)
    assert outcome[0].loc == ["events", 3, "user_id"]


def test_the_broker_connection_over_tls_verifies_the_certificate() -> None:
    app = make_celery(Settings(redis_url="rediss://cache.example:6379/0"))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert not make_celery(Settings(redis_url="redis://127.0.0.1:6379/0")).conf.broker_use_ssl


def test_the_publisher_holds_a_bounded_number_of_events() -> None:
    """Past SLUICE_MAX_PENDING_EVENTS waiting for Redis, requests are refused at once, not queued in memory."""

    async def run() -> None:
        release = asyncio.Event()

        async def slow_redis(message: object, marks: object) -> list[str]:
            await release.wait()  # Redis answers only when the test says so
            return []

        publisher = BatchingPublisher(slow_redis, max_events=10, linger_s=0, deadline_s=5, max_pending_events=15)
        publisher.start()
        first = asyncio.create_task(publisher.submit([{"event_id": "a"}] * 10, ["f"] * 10, "r1"))
        await asyncio.sleep(0.05)  # taken by the publisher, now waiting for Redis
        second = asyncio.create_task(publisher.submit([{"event_id": "b"}] * 10, ["f"] * 10, "r2"))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await publisher.submit([{"event_id": "c"}] * 6, ["f"] * 6, "r3")
        release.set()
        await asyncio.gather(first, second)
        await publisher.close()

    asyncio.run(run())


def _recording_redis() -> tuple[list[int], EnqueueFn]:
    """A publish that writes nothing and records how many events each message carried."""
    sizes: list[int] = []

    async def redis(message: Message, marks: Sequence[tuple[str, bytes]]) -> list[str]:
        sizes.append(len(marks))
        return []

    return sizes, redis


def test_the_publisher_fills_messages_only_while_the_queue_has_a_backlog() -> None:
    """One request at a time: a message each while workers keep up (no wait), one shared message while
    messages wait in the queue (the backlog linger), which is what lets workers catch up."""

    async def messages_for(backlogged: bool) -> tuple[list[int], float]:
        sizes, redis = _recording_redis()
        publisher = BatchingPublisher(redis, max_events=100, linger_s=0.5, deadline_s=5,
                                      backlog_linger_s=0.3, backlogged=lambda: backlogged)  # fmt: skip
        publisher.start()
        started = time.monotonic()
        first = await publisher.submit([{"event_id": "a0"}], ["f"], "r0") if not backlogged else None
        quiet_s = time.monotonic() - started
        tasks = []
        for i in range(1, 6):
            tasks.append(asyncio.create_task(publisher.submit([{"event_id": f"a{i}"}], ["f"], f"r{i}")))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        await publisher.close()
        assert first in (None, [NEW])
        return sizes, quiet_s

    quiet, quiet_s = asyncio.run(messages_for(backlogged=False))
    assert quiet_s < 0.25, "an idle API must not wait for company"
    assert quiet == [1] * 6
    behind, _ = asyncio.run(messages_for(backlogged=True))
    assert sum(behind) == 5
    assert len(behind) <= 2, behind


def test_the_backlog_linger_ends_once_requests_stop_coming() -> None:
    """With a backlog, a message waits for company, but only while requests keep coming: a burst of requests
    whose clients wait for their answers (a few connections sending batches) is sent once none has come for
    the busy linger, not after the whole backlog linger; requests that keep coming keep filling it."""

    async def run(every_s: float, count: int) -> tuple[list[int], float]:
        sizes, redis = _recording_redis()
        publisher = BatchingPublisher(redis, max_events=100, linger_s=0.03, deadline_s=5,
                                      backlog_linger_s=0.6, backlogged=lambda: True)  # fmt: skip
        publisher.start()
        started = time.monotonic()
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(publisher.submit([{"event_id": f"b{i}"}], ["f"], f"r{i}")))
            await asyncio.sleep(every_s)
        await asyncio.gather(*tasks)
        took = time.monotonic() - started
        await publisher.close()
        return sizes, took

    burst, burst_s = asyncio.run(run(0, 4))
    assert burst == [4]
    assert burst_s < 0.3, f"a burst waited {burst_s:.2f} s: the whole backlog linger, not the quiet gap"
    steady, _ = asyncio.run(run(0.01, 20))  # a request every 10 ms (< the 30 ms quiet gap) for 0.2 s
    assert sum(steady) == 20
    assert len(steady) <= 2, steady


def test_a_message_with_enough_events_waits_for_no_company() -> None:
    """A request that makes a message worth sending (``ENOUGH_EVENTS``) goes out at once, whatever linger would
    apply; one event fewer, with a backlog, waits for company as before. (Four connections of 100-event batches
    each waited out the lingers, four requests to a message: 19,700-26,400 events/s against 26,900-33,200.)"""
    enough = BatchingPublisher.ENOUGH_EVENTS

    async def run(*counts: int) -> tuple[list[int], float]:
        """Requests of ``counts`` events, 20 ms apart; how the messages came out, and when the last answer did."""
        sizes, redis = _recording_redis()
        publisher = BatchingPublisher(redis, max_events=5 * enough, linger_s=0.5, deadline_s=5,
                                      backlog_linger_s=0.5, backlogged=lambda: True)  # fmt: skip
        publisher.start()
        started = time.monotonic()
        tasks = []
        for r, count in enumerate(counts):
            events = [{"event_id": f"r{r}e{i}"} for i in range(count)]
            tasks.append(asyncio.create_task(publisher.submit(events, ["f"] * count, f"r{r}")))
            await asyncio.sleep(0.02)
        answers = await asyncio.gather(*tasks)
        took = time.monotonic() - started
        await publisher.close()
        assert answers == [[NEW] * count for count in counts]
        return sizes, took

    sizes, took = asyncio.run(run(enough))
    assert sizes == [enough]
    assert took < 0.25, f"a message of {enough} events waited {took:.2f} s for company"
    # A message already lingering is sent the moment a request brings it to enough.
    sizes, took = asyncio.run(run(enough // 2, enough - enough // 2))
    assert sizes == [enough]
    assert took < 0.25, f"a message that reached {enough} events while it lingered waited {took:.2f} s"
    sizes, took = asyncio.run(run(enough - 1))
    assert sizes == [enough - 1]
    assert took >= 0.4, f"a smaller message went out after {took:.2f} s, not after the backlog linger"


def test_the_publisher_fills_messages_while_requests_arrive_fast_and_never_waits_when_they_do_not() -> None:
    """The rate linger: requests about 1 ms apart share messages once the publisher has seen the rate; requests
    30 ms apart, and the first one after a pause, go out at once, each in its own message."""

    async def run() -> tuple[list[int], list[int], float]:
        sizes, redis = _recording_redis()
        publisher = BatchingPublisher(redis, max_events=1000, linger_s=0, deadline_s=5, rate_linger_s=0.05)
        publisher.start()

        async def one(i: int) -> float:
            started = time.monotonic()
            assert await publisher.submit([{"event_id": f"e{i}"}], ["f"], f"r{i}") == [NEW]
            return time.monotonic() - started

        slow = []
        for i in range(8):  # one at a time, 30 ms apart: never lingered
            slow.append(await one(i))
            await asyncio.sleep(0.03)
        slow_sizes = list(sizes)
        sizes.clear()
        fast = []
        for i in range(100, 200):
            fast.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.001)
        await asyncio.gather(*fast)
        await asyncio.sleep(0.3)  # a pause: the next lone request goes out at once
        after_pause = await one(999)
        await publisher.close()
        return slow_sizes, sizes, max([*slow, after_pause])

    slow_sizes, fast_sizes, quiet_s = asyncio.run(run())
    assert slow_sizes == [1] * 8
    assert quiet_s < 0.025, f"a request waited {quiet_s * 1000:.0f} ms with no one to share its message"
    assert sum(fast_sizes) == 101
    # Without the rate linger every request has a message of its own (101); about the first 35 do here, while
    # the smoothed gap comes down, and the rest share a few.
    assert len(fast_sizes) <= 60, fast_sizes
    assert max(fast_sizes) >= 10, fast_sizes


@pytest.mark.parametrize("concurrency", [1, 3])
def test_the_publisher_keeps_up_to_its_concurrency_of_messages_in_flight(concurrency: int) -> None:
    """While Redis has not answered, the next requests go out in messages of their own, up to the limit;
    past it they wait, and join one message once a slot frees."""

    async def run() -> list[int]:
        release = asyncio.Event()
        in_flight: list[int] = []
        sizes: list[int] = []

        async def slow_redis(message: object, marks: list[object]) -> list[str]:
            in_flight.append(len(marks))
            await release.wait()
            sizes.append(len(marks))
            return []

        publisher = BatchingPublisher(slow_redis, max_events=100, linger_s=0, deadline_s=5, concurrency=concurrency)
        publisher.start()
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(publisher.submit([{"event_id": f"e{i}"}], ["f"], f"r{i}")))
            await asyncio.sleep(0.02)
        assert len(in_flight) == concurrency, in_flight  # the rest wait for a slot
        release.set()
        assert await asyncio.gather(*tasks) == [[NEW]] * 5
        await publisher.close()
        return sizes

    sizes = asyncio.run(run())
    assert sum(sizes) == 5
    # Requests that waited for a slot share the next message.
    assert sizes == ([1] * concurrency + [5 - concurrency])


def test_every_request_is_answered_within_the_deadline_of_its_arrival() -> None:
    """A publish stalled past its own deadline holds the one slot: the request in it is answered unknown, and
    the one waiting for the slot is refused (its events never left the process), each within the deadline
    of its own arrival, not after the publish ahead of it and then its own."""

    async def run() -> list[tuple[str, float]]:
        release = asyncio.Event()
        calls: list[int] = []

        async def stalled_redis(message: object, marks: list[object]) -> list[str]:
            calls.append(len(marks))
            while not release.is_set():  # deaf to the publish's own deadline until released
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()
            return []

        publisher = BatchingPublisher(stalled_redis, max_events=100, linger_s=0, deadline_s=0.3, concurrency=1)
        publisher.start()

        async def answer(i: int) -> tuple[str, float]:
            began = time.monotonic()
            try:
                outcome = str(await publisher.submit([{"event_id": f"e{i}"}], ["f"], f"r{i}"))
            except PublishError as exc:
                outcome = "refused" if exc.definite else "unknown"
            return outcome, time.monotonic() - began

        first = asyncio.create_task(answer(0))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(answer(1))
        try:
            answers = await asyncio.wait_for(asyncio.gather(first, second), 3)
        finally:
            release.set()  # else a failure here would leave the stalled publish deaf for good
        assert calls == [1], "the waiting request must not have been sent"
        assert await publisher.submit([{"event_id": "e2"}], ["f"], "r2") == [NEW]
        await publisher.close()
        return answers

    (first, first_s), (second, second_s) = asyncio.run(run())
    assert (first, second) == ("unknown", "refused")
    assert first_s < 0.5, first_s
    assert second_s < 0.5, second_s


def test_a_request_cancelled_while_it_waits_does_not_cancel_the_message_it_shares() -> None:
    """A request whose task is cancelled (its client went away) stops waiting; the message it shares with
    other requests is still written, theirs answered, and its deadline timer fires into nothing."""

    async def run() -> tuple[list[str], list[int]]:
        written: list[int] = []

        async def slow_redis(message: object, marks: list[object]) -> list[str]:
            await asyncio.sleep(0.1)
            written.append(len(marks))
            return []

        publisher = BatchingPublisher(slow_redis, max_events=100, linger_s=0.05, deadline_s=0.3, concurrency=1)
        publisher.start()
        publisher._busy = True  # linger for company, so both requests share the next message
        leaver = asyncio.create_task(publisher.submit([{"event_id": "a"}], ["f"], "r1"))
        stayer = asyncio.create_task(publisher.submit([{"event_id": "b"}], ["f"], "r2"))
        await asyncio.sleep(0.08)  # the message is on its way to Redis
        leaver.cancel()
        answer = await stayer
        with contextlib.suppress(asyncio.CancelledError):
            await leaver
        await asyncio.sleep(0.4)  # past both deadlines: nothing fires into a settled request
        await publisher.close()
        return answer, written

    answer, written = asyncio.run(run())
    assert answer == [NEW]
    assert written == [2]


def test_a_request_submitted_without_a_task_hears_its_outcome_once() -> None:
    """``submit_soon`` (the single-event lane's, api/ingest.py): its callback gets what ``submit`` would return
    or raise, exactly once. The statuses when its message is written (here shared with an awaiting request);
    the error at its deadline when the publish stalls, and nothing more when that publish lands after all;
    a refusal raised at once, with no call."""

    async def run() -> tuple[list[tuple[str, list[str], str]], list[str], list[int]]:
        heard: list[tuple[str, list[str], str]] = []
        written: list[int] = []
        stalled = asyncio.Event()
        release = asyncio.Event()

        async def redis(message: object, marks: list[object]) -> list[str]:
            while stalled.is_set() and not release.is_set():  # deaf to the publish's own deadline
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()
            written.append(len(marks))
            return []

        def hear(name: str) -> Callable[[list[str], PublishError | None], None]:
            def settled(statuses: list[str], error: PublishError | None) -> None:
                outcome = "ok" if error is None else ("refused" if error.definite else "unknown")
                heard.append((name, statuses, outcome))

            return settled

        publisher = BatchingPublisher(redis, max_events=100, linger_s=0.05, deadline_s=0.3, max_pending_events=3)
        publisher.start()
        publisher._busy = True  # linger for company, so both requests share the next message
        publisher.submit_soon([{"event_id": "a"}], ["f"], "r1", hear("a"))
        shared = await publisher.submit([{"event_id": "b"}], ["f"], "r2")
        stalled.set()
        publisher.submit_soon([{"event_id": "c"}], ["f"], "r3", hear("c"))
        await asyncio.sleep(0.5)  # past c's deadline
        release.set()
        await asyncio.sleep(0.1)  # the stalled publish lands: c has had its answer
        with pytest.raises(Overloaded):
            publisher.submit_soon([{"event_id": f"d{i}"} for i in range(4)], ["f"] * 4, "r4", hear("d"))
        await publisher.close()
        return heard, shared, written

    heard, shared, written = asyncio.run(run())
    assert shared == [NEW]
    assert written == [2, 1], "a and b in one message; then c's, which landed late"
    assert heard == [("a", [NEW], "ok"), ("c", [], "unknown")]


def test_a_callback_that_fails_keeps_no_other_request_of_its_message_from_its_answer() -> None:
    async def run() -> list[str]:
        heard: list[str] = []

        async def redis(message: object, marks: list[object]) -> list[str]:
            return []

        def broken(statuses: list[str], error: PublishError | None) -> None:
            raise RuntimeError("the answer could not be written")

        publisher = BatchingPublisher(redis, max_events=100, linger_s=0.05, deadline_s=0.3)
        publisher.start()
        publisher._busy = True  # linger for company, so both requests share the next message
        publisher.submit_soon([{"event_id": "a"}], ["f"], "r1", broken)
        publisher.submit_soon([{"event_id": "b"}], ["f"], "r2", lambda statuses, error: heard.extend(statuses))
        await asyncio.sleep(0.2)
        await publisher.close()
        return heard

    assert asyncio.run(run()) == [NEW]


def test_the_publisher_fails_fast_after_a_refusal_but_not_after_a_timeout() -> None:
    """Redis refusing (away, full): the next requests are refused at once for a moment. Redis slow (a publish
    past its deadline): the next request still tries Redis."""

    async def run() -> tuple[list[str], str]:
        answers: list[BaseException | None] = [TimeoutError(), None, ConnectionRefusedError("refused"), None]
        calls: list[str] = []

        async def redis(message: object, marks: list[object]) -> list[str]:
            calls.append("call")
            answer = answers.pop(0)
            if answer is not None:
                raise answer
            return []

        publisher = BatchingPublisher(redis, max_events=10, linger_s=0, deadline_s=5)
        publisher.start()
        outcomes = []
        for i in range(4):
            try:
                outcomes.append(str(await publisher.submit([{"event_id": f"e{i}"}], ["f"], f"r{i}")))
            except PublishError as exc:
                outcomes.append(f"{'refused' if exc.definite else 'unknown'}")
        await publisher.close()
        return outcomes, f"{len(calls)} calls"

    outcomes, calls = asyncio.run(run())
    # timeout -> unknown; the next one tries Redis and lands; refused; the next one fails fast without a call.
    assert outcomes == ["unknown", str([NEW]), "refused", "refused"]
    assert calls == "3 calls"


def test_the_worker_converts_only_the_exact_queued_form_without_validating() -> None:
    """The fast path trusts the API's messages but still refuses any other shape (then the model decides)."""
    good = queued_form(EVENT_ADAPTER.validate_python(booking()))
    row = parse_queued(good)
    assert row is not None
    # A row's values are bound to ``day`` and then the tables' columns up to the last type's fields.
    names = ("day", *EVENT_COLUMNS[:-1])
    columns = dict(zip(names, row.values, strict=True))
    assert columns["day"].isoformat() == "2026-11-25"
    assert (columns["guests"], columns["total_price"], columns["currency"]) == (2, Decimal("449.70"), "EUR")
    # Other types' columns stay unset (never null: a null is a tombstone).
    assert all(columns[f.name] is UNSET_VALUE for f in TYPE_FIELDS if f.name not in BookingEvent.model_fields)
    view_row = parse_queued(queued_form(EVENT_ADAPTER.validate_python(view())))
    assert view_row is not None
    assert view_row.values[-len(TYPE_FIELDS) :] == (UNSET_VALUE,) * len(TYPE_FIELDS)
    for bad in (
        good | {"occurred_at": "2026-11-25T09:30:00.250+01:00"},  # not the queued form: validate in full
        good | {"listing_id": "42"},
        good | {"guests": True},
        good | {"extra": 1},
        {k: v for k, v in good.items() if k != "currency"},
        good | {"type": "click"},
        good | {"event_id": "not-a-uuid"},
        good | {"check_in": "2026-13-01"},
        good | {"total_price": "a lot"},
        [good],
    ):
        assert parse_queued(bad) is None, bad


@pytest.mark.parametrize(
    "value",
    ["1764063000", "1764063000.25", "2026-11-25 09:30:00Z", "2026-11-25T09:30Z", "2026-11-25T09:30:00+0100",
     "2026-11-25T09:30:00", "20261125T093000Z", "2026-11-25"],
)  # fmt: skip
def test_occurred_at_must_be_rfc_3339_with_an_offset(value: str) -> None:
    errors = validate_event(view(occurred_at=value))
    assert isinstance(errors, list), f"{value!r} was accepted"
    assert [e.loc for e in errors] == [["occurred_at"]]
    assert "RFC 3339" in errors[0].msg
    assert ("Unix time" in errors[0].msg) == value[0:10].isdigit()


@pytest.mark.parametrize("value", ["2026-11-25T09:30:00Z", "2026-11-25t09:30:00.250z", "2026-11-25T09:30:00.25-05:30"])
def test_rfc_3339_forms_are_accepted(value: str) -> None:
    assert not isinstance(validate_event(view(occurred_at=value)), list)


def test_retries_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    """A message whose writes fail waits 1, 2, 4, ... s (each with jitter down to half), up to the cap: workers
    do not hammer a recovering Cassandra, nor in step."""
    from worker.tasks import backoff_s, settings

    base, cap = settings.task_retry_backoff_s, settings.task_retry_backoff_max_s
    for retries in range(12):
        ceiling = min(cap, base * 2**retries)
        waits = [backoff_s(retries) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (retries, min(waits), max(waits))
        assert max(waits) - min(waits) > ceiling / 10, "no jitter"

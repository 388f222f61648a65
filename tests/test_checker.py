"""The exactly-once checker can fail: each defect planted in the real Cassandra is reported, and only that.

Each test writes a small run's events the way the worker does (same statements, same write timestamps) on
listings of its own, records what a client was told in a Ledger, plants one defect with plain CQL, and
asserts the checker's counts (and the API's ``/stats``, which counts listing rows) show exactly that defect.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest
from cassandra.cluster import Session

from loadtests.checker import Checker, Ledger, Report, api_stats
from sluice.cassandra import Store
from sluice.events import queued_form, validate_event
from tests.support import TEST_KEY, Service, stored_rows
from worker.writer import parse_queued

pytestmark = pytest.mark.timeout(120)

ZERO = {"lost": 0, "duplicated": 0, "unexpected": 0, "conflicting": 0, "partial": 0, "stats_mismatched": 0}


class Run:
    """Twelve accepted events (views and bookings) on three listings unique to this run, stored as the worker
    stores them; one refused event, and two of unknown outcome (one of them stored)."""

    def __init__(self, session: Session, api: Service) -> None:
        self.session = session
        self.store = Store(session.cluster, session, session.keyspace)
        self.api = api
        base = random.randrange(10**12, 2 * 10**12)
        self.listings = [base, base + 1, base + 2]
        # In the past: rows carry write timestamps derived from occurred_at, and a test's DELETE (stamped with the
        # clock) must be newer than them to take effect.
        now = dt.datetime.now(dt.UTC).replace(microsecond=123_000) - dt.timedelta(seconds=1)
        self.ledger = Ledger()
        self.events: list[dict[str, Any]] = []
        for i in range(12):
            event = self.event(self.listings[i % 3], now - dt.timedelta(seconds=i), booking=i % 4 == 0)
            self.events.append(event)
            self.write(event)
            self.ledger.record(event, "accepted")
        self.refused = self.event(self.listings[0], now)
        self.ledger.record(self.refused, "refused")
        self.unknown_stored = self.event(self.listings[1], now)
        self.write(self.unknown_stored)
        self.unknown_lost = self.event(self.listings[2], now)
        for event in (self.unknown_stored, self.unknown_lost):
            self.ledger.record(event, "unknown")

    @staticmethod
    def event(listing_id: int, at: dt.datetime, *, booking: bool = False) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_id": str(uuid.uuid4()), "type": "booking" if booking else "view", "listing_id": listing_id,
            "user_id": 7, "occurred_at": at.astimezone(dt.timezone(dt.timedelta(hours=1))).isoformat(),
        }  # fmt: skip
        if booking:
            event |= {"check_in": "2027-01-01", "check_out": "2027-01-04", "guests": 2, "total_price": "449.70",
                      "currency": "EUR"}  # fmt: skip
        return event

    def write(self, event: dict[str, Any], *, by_id: bool = True) -> None:
        model = validate_event(event)
        assert not isinstance(model, list), model
        row = parse_queued(queued_form(model))
        assert row is not None
        params = (*row.values, dt.datetime.now(dt.UTC), row.timestamp_us, 0)  # TTL 0: kept forever
        self.session.execute(self.store.insert_by_listing, params)
        if by_id:
            self.session.execute(self.store.insert_by_id, params)

    def cql(self, statement: str, *args: Any) -> None:
        self.session.execute(statement, args)

    def check(self) -> Report:
        checker = Checker(session=self.session)
        return checker.check(self.ledger, stats=api_stats(self.api.base_url, TEST_KEY))


@pytest.fixture
def run(cassandra: Session, api: Service) -> Run:
    return Run(cassandra, api)


def only(report: Report, **expected: int) -> None:
    assert report.counts() == ZERO | expected, report.as_json()


def ids(values: list[UUID]) -> set[str]:
    return {str(v) for v in values}


def test_a_clean_run_passes(run: Run) -> None:
    report = run.check()
    only(report)
    assert report.stored_once == report.checked == 12
    assert (report.unresolved, report.unresolved_stored, report.refused) == (2, 1, 1)
    assert report.stats_checked == 3  # three listings, one day each (the run spans seconds)
    assert report.partitions_scanned >= 3


def test_a_deleted_by_id_row_is_lost(run: Run) -> None:
    victim = run.events[5]["event_id"]
    run.cql("DELETE FROM events_by_id WHERE event_id = %s", UUID(victim))
    report = run.check()
    only(report, lost=1)
    assert ids(report.lost) == {victim}


def test_a_deleted_listing_row_is_lost_and_stats_show_it(run: Run) -> None:
    event = run.events[4]
    row = run.session.execute("SELECT day, occurred_at FROM events_by_id WHERE event_id = %s",
                              (UUID(event["event_id"]),)).one()  # fmt: skip
    run.cql("DELETE FROM events_by_listing_day WHERE listing_id = %s AND day = %s AND occurred_at = %s"
            " AND event_id = %s", event["listing_id"], row.day, row.occurred_at, UUID(event["event_id"]))  # fmt: skip
    report = run.check()
    only(report, lost=1, stats_mismatched=1)
    assert ids(report.lost) == {event["event_id"]}


def _copy_listing_row(run: Run, event: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> None:
    """A second events_by_listing_day row for the event, with ``change`` applied to its JSON first."""
    copy = dict(event)
    change(copy)
    run.write(copy, by_id=False)


def test_a_second_listing_row_in_another_partition_is_a_duplicate(run: Run) -> None:
    # From listing 1 to listing 0, same day. (Not to listing 2: the run's event of unknown outcome there
    # allows its stats one view more, which would hide the extra row from the stats check.)
    event = run.events[1]
    _copy_listing_row(run, event, lambda e: e.update(listing_id=run.listings[0]))
    report = run.check()
    # /stats counts rows: the other listing now shows one view too many.
    only(report, duplicated=1, stats_mismatched=1)
    assert ids(report.duplicated) == {event["event_id"]}


def test_a_second_listing_row_on_another_day_is_a_duplicate(run: Run) -> None:
    event = run.events[2]
    later = dt.datetime.fromisoformat(event["occurred_at"]) + dt.timedelta(days=1)
    _copy_listing_row(run, event, lambda e: e.update(occurred_at=later.isoformat()))
    # A day later lies outside the default scan window (the run's span +- 2 minutes, which keeps bulk checks
    # cheap); a caller that must catch rows that far off widens the margin.
    report = Checker(session=run.session).check(run.ledger, margin=dt.timedelta(days=1))
    only(report, duplicated=1)
    assert ids(report.duplicated) == {event["event_id"]}


def test_a_second_listing_row_in_the_same_partition_is_a_duplicate(run: Run) -> None:
    event = run.events[3]
    later = dt.datetime.fromisoformat(event["occurred_at"]) + dt.timedelta(milliseconds=1500)
    _copy_listing_row(run, event, lambda e: e.update(occurred_at=later.isoformat()))
    report = run.check()
    only(report, duplicated=1, stats_mismatched=1)
    assert ids(report.duplicated) == {event["event_id"]}


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("events_by_id", "user_id", 8),
        ("events_by_listing_day", "user_id", 8),
        ("events_by_id", "total_price", "449.71"),
        ("events_by_listing_day", "currency", "USD"),
    ],
)
def test_a_changed_field_is_a_conflict(run: Run, table: str, column: str, value: Any) -> None:
    event = run.events[0]  # a booking
    eid = UUID(event["event_id"])
    row = run.session.execute("SELECT day, occurred_at FROM events_by_id WHERE event_id = %s", (eid,)).one()
    if column == "total_price":
        from decimal import Decimal

        value = Decimal(value)
    if table == "events_by_id":
        run.cql(f"UPDATE events_by_id SET {column} = %s WHERE event_id = %s", value, eid)
    else:
        key = (event["listing_id"], row.day, row.occurred_at, eid)
        run.cql(f"UPDATE events_by_listing_day SET {column} = %s WHERE listing_id = %s AND day = %s"
                " AND occurred_at = %s AND event_id = %s", value, *key)  # fmt: skip
    report = run.check()
    only(report, conflicting=1)
    assert ids(report.conflicting) == {event["event_id"]}
    assert column in " ".join(report.details["conflicting"])


def test_a_later_different_version_accepted_and_stored_is_a_conflict(run: Run) -> None:
    """The current API accepts a second body for a known id; the later occurred_at wins in Cassandra."""
    event = run.events[6]
    at = dt.datetime.fromisoformat(event["occurred_at"]) + dt.timedelta(seconds=1)
    later = dict(event, occurred_at=at.isoformat(), user_id=99)
    run.write(later)
    run.ledger.record(later, "accepted")
    report = run.check()
    # by id: the second version replaced the first; by listing: a row under each occurred_at.
    only(report, duplicated=1, conflicting=1, stats_mismatched=1)
    assert report.accepted_conflicts == 1


def test_a_refused_event_that_is_stored_is_unexpected(run: Run) -> None:
    run.write(run.refused)
    report = run.check()
    only(report, unexpected=1, stats_mismatched=1)
    assert ids(report.unexpected) == {run.refused["event_id"]}


def test_an_event_never_sent_in_the_runs_listings_is_unexpected(run: Run) -> None:
    stranger = Run.event(run.listings[0], dt.datetime.now(dt.UTC), booking=True)
    run.write(stranger)
    report = run.check()
    only(report, unexpected=1, stats_mismatched=1)
    assert ids(report.unexpected) == {stranger["event_id"]}


def test_an_unknown_outcome_stored_half_is_partial(run: Run) -> None:
    run.cql("DELETE FROM events_by_id WHERE event_id = %s", UUID(run.unknown_stored["event_id"]))
    report = run.check()
    only(report, partial=1)


def test_stored_rows_counts_a_second_listing_row(run: Run) -> None:
    """The single-event tests' helper sees a duplicate too (it used to be a point read: 0 or 1)."""
    event = run.events[7]
    assert stored_rows(run.session, event["event_id"]) == (1, 1)
    at = dt.datetime.fromisoformat(event["occurred_at"]) + dt.timedelta(seconds=3)
    _copy_listing_row(run, event, lambda e: e.update(occurred_at=at.isoformat()))
    assert stored_rows(run.session, event["event_id"]) == (1, 2)
    run.cql("DELETE FROM events_by_id WHERE event_id = %s", UUID(event["event_id"]))
    assert stored_rows(run.session, event["event_id"]) == (0, 0)

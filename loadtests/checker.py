"""The exactly-once checker: what a run's clients were told, held against what Cassandra and ``/stats`` hold.

One module for every place that judges the pipeline (the fault tests, the chaos run, the load test and the
bench). Clients record each event's outcome in a :class:`Ledger`; :meth:`Checker.check` then reads

- ``events_by_id`` for every id the run sent (bulk ``IN`` reads), and
- every ``(listing_id, day)`` partition of ``events_by_listing_day`` the run could have written, scanned over
  the run's time window (not point reads: a second row of an id under another ``occurred_at`` or in another
  partition of the run's listings must show up),

and compares every stored row, field by field, with the version the client had accepted. Listings should be
unique to the run, so that every row in the scanned partitions is the run's own: a row of an id the run
never sent there is *unexpected*.

Counts (each must be 0):

- ``lost``: accepted (202, status "accepted"), but not in ``events_by_id`` or with no row in its listing's
  partition (half-written counts as lost: a reader by id or by listing would not see it);
- ``duplicated``: more than one ``events_by_listing_day`` row for one id (same partition under another
  ``occurred_at``, or rows in two partitions);
- ``unexpected``: a stored row of an id that was definitely refused (and never accepted nor of unknown
  outcome), or of an id the run never sent, in the run's listings;
- ``conflicting``: a stored row whose fields differ from the first accepted version of the id (first write
  wins), or, for an id of unknown outcome, from every version sent;
- ``partial``: an id of unknown outcome stored in one table only;
- ``stats_mismatched``: ``/stats`` views/bookings of a (listing, day) outside what the accepted (and the
  unresolved) events allow.

``unresolved`` (ids whose outcome the client never learnt, after its retries) is reported beside them; the
callers bound it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Self
from uuid import UUID

import httpx
from cassandra.cluster import Cluster, Session
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.util import Date

#: Ids or listings per ``IN`` query: large enough to amortise round trips, small enough for the coordinator.
CHUNK = 100
#: Partition scans cover the run's occurred_at span plus this margin on each side.
WINDOW_MARGIN = dt.timedelta(seconds=120)
#: The fields compared between what was accepted and what is stored (both tables).
FIELDS = (
    "type",
    "listing_id",
    "user_id",
    "occurred_at",
    "day",
    "check_in",
    "check_out",
    "guests",
    "total_price",
    "currency",
)
_COLUMNS = "event_id, " + ", ".join(FIELDS)

Outcome = Literal["accepted", "refused", "unknown"]


def _ms(value: dt.datetime) -> dt.datetime:
    """An instant as stored: UTC, milliseconds (Cassandra's timestamp keeps ms; the driver truncates)."""
    utc = value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def _date(value: Any) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, Date):  # the driver's own type (it also holds days outside Python's range)
        day: dt.date = value.date()
        return day
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value))


@dataclass(frozen=True, slots=True)
class Expected:
    """One version of an event, normalised to the form Cassandra stores it in (so equality is the check)."""

    event_id: UUID
    type: str
    listing_id: int
    user_id: int
    occurred_at: dt.datetime
    check_in: dt.date | None = None
    check_out: dt.date | None = None
    guests: int | None = None
    total_price: Decimal | None = None
    currency: str | None = None

    @property
    def day(self) -> dt.date:
        return self.occurred_at.date()

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> Expected:
        """From the JSON a client sent (contract v1)."""
        price = event.get("total_price")
        return cls(
            event_id=UUID(str(event["event_id"])),
            type=str(event["type"]),
            listing_id=int(event["listing_id"]),
            user_id=int(event["user_id"]),
            occurred_at=_ms(dt.datetime.fromisoformat(str(event["occurred_at"]))),
            check_in=_date(event.get("check_in")),
            check_out=_date(event.get("check_out")),
            guests=None if event.get("guests") is None else int(event["guests"]),
            total_price=None if price is None else Decimal(str(price)),
            currency=event.get("currency"),
        )

    @classmethod
    def of_row(cls, row: Any) -> Expected:
        """From a Cassandra row of either table (the driver gives naive UTC datetimes)."""
        return cls(
            event_id=row.event_id,
            type=row.type,
            listing_id=row.listing_id,
            user_id=row.user_id,
            occurred_at=_ms(row.occurred_at),
            check_in=_date(row.check_in),
            check_out=_date(row.check_out),
            guests=row.guests,
            total_price=row.total_price,
            currency=row.currency,
        )

    def differences(self, row: Any) -> list[str]:
        """``field: stored != expected`` for every field of a stored row that differs from this version."""
        stored = Expected.of_row(row)
        out = []
        for name in FIELDS:
            want = getattr(self, name)
            got = _date(row.day) if name == "day" else getattr(stored, name)
            # Decimals compare by value: "449.70" and "449.7" are the same price.
            if got != want:
                out.append(f"{name}: stored {got!r} != sent {want!r}")
        return out


@dataclass
class Ledger:
    """What the clients of one run were told, per event id and per version (body) of it.

    ``record`` takes every answer (retries included); the final state of an id is *accepted* (some version
    was accepted: the first such version is the one that must be stored), else *unresolved* (some attempt's
    outcome is unknown: it may or may not be stored, once, as one of those versions), else *refused* (every
    attempt was definitely refused: it must not be stored).
    """

    #: Every listing the run used (unique to the run): the partitions scanned for unexpected rows.
    listings: set[int] = field(default_factory=set)
    versions: dict[UUID, list[Expected]] = field(default_factory=dict)
    first_accepted: dict[UUID, Expected] = field(default_factory=dict)
    #: Ids for which a version other than the first accepted one was also accepted: the API answers 409 only
    #: while the first is queued; after it is stored, the later version gets 202 and must be dead-lettered
    #: as a conflict, never stored (the checker holds the stored row to the first accepted version).
    accepted_conflicts: set[UUID] = field(default_factory=set)
    #: Versions whose last attempt had an unknown outcome and that were not accepted since.
    unknown: dict[UUID, set[Expected]] = field(default_factory=dict)
    refused_ids: set[UUID] = field(default_factory=set)

    def record(self, event: Mapping[str, Any] | Expected, outcome: Outcome) -> Expected:
        version = event if isinstance(event, Expected) else Expected.of(event)
        eid = version.event_id
        self.listings.add(version.listing_id)
        known = self.versions.setdefault(eid, [])
        if version not in known:
            known.append(version)
        if outcome == "accepted":
            first = self.first_accepted.setdefault(eid, version)
            if first != version:
                self.accepted_conflicts.add(eid)
            self.unknown.pop(eid, None)
            self.refused_ids.discard(eid)
        elif outcome == "unknown":
            if eid not in self.first_accepted:
                self.unknown.setdefault(eid, set()).add(version)
                self.refused_ids.discard(eid)
        elif eid not in self.first_accepted and eid not in self.unknown:
            # A definite refusal says nothing about an earlier attempt of unknown outcome: that stays unknown.
            self.refused_ids.add(eid)
        return version

    @property
    def accepted(self) -> dict[UUID, Expected]:
        return self.first_accepted

    @property
    def unresolved(self) -> dict[UUID, set[Expected]]:
        return {eid: v for eid, v in self.unknown.items() if eid not in self.first_accepted}

    @property
    def refused(self) -> set[UUID]:
        return {eid for eid in self.refused_ids if eid not in self.first_accepted and eid not in self.unknown}

    def counts(self) -> dict[str, int]:
        return {
            "sent": len(self.versions),
            "accepted": len(self.first_accepted),
            "refused": len(self.refused),
            "unresolved": len(self.unresolved),
            "accepted_conflicts": len(self.accepted_conflicts),
        }


@dataclass
class Report:
    checked: int = 0
    stored_once: int = 0
    lost: list[UUID] = field(default_factory=list)
    duplicated: list[UUID] = field(default_factory=list)
    unexpected: list[UUID] = field(default_factory=list)
    conflicting: list[UUID] = field(default_factory=list)
    partial: list[UUID] = field(default_factory=list)
    unresolved: int = 0
    unresolved_stored: int = 0
    refused: int = 0
    accepted_conflicts: int = 0
    #: Second bodies accepted after the first was stored that are not dead-lettered as conflicts (set by the
    #: chaos run, which reads Redis; the checker itself reads only Cassandra and the API).
    conflicts_not_dead_lettered: list[UUID] = field(default_factory=list)
    partitions_scanned: int = 0
    rows_scanned: int = 0
    stats_checked: int = 0
    #: (listing_id, day, "views"/"bookings", reported, lowest allowed, highest allowed)
    stats_mismatched: list[tuple[int, str, str, int, int, int]] = field(default_factory=list)
    #: Why each flagged id was flagged (what the rows held), for the first few of each kind.
    details: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0

    def note(self, kind: str, eid: UUID | str, why: str, keep: int = 20) -> None:
        if len(self.details[kind]) < keep:
            self.details[kind].append(f"{eid}: {why}")

    def counts(self) -> dict[str, int]:
        return {
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "unexpected": len(self.unexpected),
            "conflicting": len(self.conflicting),
            "partial": len(self.partial),
            "stats_mismatched": len(self.stats_mismatched),
        }

    @property
    def total(self) -> int:
        return self.checked

    @property
    def ok(self) -> bool:
        return not any(self.counts().values())

    def as_json(self, sample: int = 20) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "stored_once": self.stored_once,
            **self.counts(),
            "unresolved": self.unresolved,
            "unresolved_stored": self.unresolved_stored,
            "refused": self.refused,
            "accepted_conflicts": self.accepted_conflicts,
            "conflicts_not_dead_lettered": len(self.conflicts_not_dead_lettered),
            "partitions_scanned": self.partitions_scanned,
            "rows_scanned": self.rows_scanned,
            "stats_checked": self.stats_checked,
            "lost_sample": [str(u) for u in self.lost[:sample]],
            "duplicated_sample": [str(u) for u in self.duplicated[:sample]],
            "unexpected_sample": [str(u) for u in self.unexpected[:sample]],
            "conflicting_sample": [str(u) for u in self.conflicting[:sample]],
            "stats_mismatched_sample": [list(m) for m in self.stats_mismatched[:sample]],
            "details": {k: v[:sample] for k, v in self.details.items()},
            "check_seconds": round(self.seconds, 2),
        }

    def line(self) -> str:
        c = self.counts()
        return (
            f"checked {self.checked:,} accepted: {self.stored_once:,} stored once; lost {c['lost']}, "
            f"duplicated {c['duplicated']}, unexpected {c['unexpected']}, conflicting {c['conflicting']}, "
            f"partial {c['partial']}, stats mismatched {c['stats_mismatched']} (of {self.stats_checked}); "
            f"unresolved {self.unresolved} ({self.unresolved_stored} stored), refused {self.refused}"
        )


def _key(row: Any) -> tuple[int, dt.date | None, dt.datetime]:
    return row.listing_id, _date(row.day), _ms(row.occurred_at)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: ``stats(listing_id, first_day, last_day)`` -> {day: (views, bookings)}
StatsFn = Callable[[int, dt.date, dt.date], dict[dt.date, tuple[int, int]]]


def api_stats(base_url: str, api_key: str, timeout: float = 30.0) -> StatsFn:
    """``GET /v1/listings/{id}/stats`` of a running API, as the checker's ``stats`` function."""

    def fetch(listing_id: int, first: dt.date, last: dt.date) -> dict[dt.date, tuple[int, int]]:
        answer = httpx.get(
            f"{base_url}/v1/listings/{listing_id}/stats",
            params={"from": first.isoformat(), "to": last.isoformat()},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )
        answer.raise_for_status()  # a failed read must never pass for "no events"
        return {dt.date.fromisoformat(d["day"]): (int(d["views"]), int(d["bookings"])) for d in answer.json()["days"]}

    return fetch


class Checker:
    """A Cassandra session with the reads prepared once; :meth:`check` judges a :class:`Ledger`."""

    def __init__(
        self,
        port: int = 9042,
        keyspace: str = "sluice",
        concurrency: int = 32,
        *,
        session: Session | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.cluster: Cluster | None = None
        if session is None:
            self.cluster = Cluster([host], port=port, connect_timeout=5, control_connection_timeout=5)
            session = self.cluster.connect(keyspace)
        self.session: Session = session
        ks = keyspace if self.cluster is not None else (session.keyspace or keyspace)
        self.concurrency = concurrency
        self.by_id = self.session.prepare(f"SELECT {_COLUMNS} FROM {ks}.events_by_id WHERE event_id IN ?")
        self.by_listing = self.session.prepare(
            f"SELECT {_COLUMNS} FROM {ks}.events_by_listing_day WHERE listing_id IN ? AND day IN ?"
            " AND occurred_at >= ? AND occurred_at <= ?"
        )

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self, statement: Any, params: list[tuple[Any, ...]], attempts: int = 5) -> list[Any]:
        """Rows of ``statement`` for every parameter set. A read that fails (a timeout on a busy or just
        unfrozen Cassandra) is tried again, up to ``attempts`` times; then it raises: a failed read must never
        pass for "not stored"."""
        rows: list[Any] = []
        todo = params
        for attempt in range(1, attempts + 1):
            if not todo:
                break
            failed: list[tuple[Any, ...]] = []
            results = execute_concurrent_with_args(
                self.session, statement, todo, concurrency=self.concurrency, raise_on_first_error=False
            )
            for args, (ok, result) in zip(todo, results, strict=True):
                if not ok:
                    if attempt == attempts:
                        raise result
                    failed.append(args)
                    continue
                try:
                    rows += list(result)  # iterating fetches further pages, which can fail too
                except Exception:
                    if attempt == attempts:
                        raise
                    failed.append(args)
            todo = failed
            if todo:
                time.sleep(0.5 * attempt)
        return rows

    def present_by_id(self, ids: Sequence[UUID]) -> set[UUID]:
        return {row.event_id for row in self.rows_by_id(ids)}

    def rows_by_id(self, ids: Sequence[UUID]) -> list[Any]:
        return self._run(self.by_id, [(list(chunk),) for chunk in _chunks(list(ids), CHUNK)])

    def scan(
        self, listings: Iterable[int], days: Iterable[dt.date], start: dt.datetime, end: dt.datetime
    ) -> tuple[list[Any], int]:
        """Every row of these listings' partitions on these days between ``start`` and ``end``."""
        ordered, day_list = sorted(set(listings)), sorted(set(days))
        params = [(list(chunk), day_list, start, end) for chunk in _chunks(ordered, max(1, CHUNK // len(day_list)))]
        return self._run(self.by_listing, params), len(ordered) * len(day_list)

    def wait_stored(
        self, ids: Iterable[UUID], timeout: float, every: float = 1.0, note: Callable[[str], None] | None = None
    ) -> int:
        """Poll ``events_by_id`` until every id is readable or ``timeout``; returns how many are missing."""
        missing = list(ids)
        deadline = time.monotonic() + timeout
        while missing:
            present = self.present_by_id(missing)
            missing = [i for i in missing if i not in present]
            if not missing or time.monotonic() >= deadline:
                break
            if note is not None:
                note(f"  {len(missing)} accepted events not readable yet; waiting")
            time.sleep(every)
        return len(missing)

    def check(
        self,
        ledger: Ledger,
        *,
        stats: StatsFn | None = None,
        stats_sample: int | None = None,
        margin: dt.timedelta = WINDOW_MARGIN,
    ) -> Report:
        """Judge what is stored against ``ledger``; ``stats`` (see :func:`api_stats`) also checks ``/stats``
        for every listing of the run (or the first ``stats_sample`` of them, in id order)."""
        started = time.monotonic()
        report = Report(
            checked=len(ledger.accepted),
            unresolved=len(ledger.unresolved),
            refused=len(ledger.refused),
            accepted_conflicts=len(ledger.accepted_conflicts),
        )
        all_versions = [v for versions in ledger.versions.values() for v in versions]
        by_id = {row.event_id: row for row in self.rows_by_id(list(ledger.versions))}
        # The partitions to scan: every listing of the run on every day of its window, plus wherever a by-id
        # row says an event lives (a changed listing or day must still find its listing rows).
        instants = [v.occurred_at for v in all_versions] + [_ms(r.occurred_at) for r in by_id.values()]
        listings = set(ledger.listings) | {r.listing_id for r in by_id.values()}
        rows: list[Any] = []
        if instants:
            start, end = min(instants) - margin, max(instants) + margin
            days = [start.date() + dt.timedelta(days=i) for i in range((end.date() - start.date()).days + 1)]
            rows, report.partitions_scanned = self.scan(listings, days, start, end)
        report.rows_scanned = len(rows)
        listing_rows: dict[UUID, list[Any]] = defaultdict(list)
        for row in rows:
            listing_rows[row.event_id].append(row)

        for eid, want in ledger.accepted.items():
            found_by_id, found = by_id.get(eid), listing_rows.get(eid, [])
            if found_by_id is None or not found:
                report.lost.append(eid)
                report.note(
                    "lost", eid, f"events_by_id: {'row' if found_by_id else 'none'}, listing rows: {len(found)}"
                )
            if len(found) > 1:
                report.duplicated.append(eid)
                where = ", ".join(f"({r.listing_id}, {r.day}, {r.occurred_at})" for r in found)
                report.note("duplicated", eid, f"{len(found)} listing rows: {where}")
            # Rows under another key (partition or occurred_at) are the duplicates, counted above; a field
            # compare is for the row where the event belongs, or for a lone row that has moved.
            home = [r for r in found if _key(r) == (want.listing_id, want.day, want.occurred_at)]
            compared = home if home or len(found) != 1 else found
            diffs = [f"by id: {d}" for d in (want.differences(found_by_id) if found_by_id is not None else [])]
            diffs += [f"listing row: {d}" for r in compared for d in want.differences(r)]
            if diffs:
                report.conflicting.append(eid)
                report.note("conflicting", eid, "; ".join(diffs))
            if found_by_id is not None and len(found) == 1 and not diffs:
                report.stored_once += 1

        for eid, versions in ledger.unresolved.items():
            found_by_id, found = by_id.get(eid), listing_rows.get(eid, [])
            if found_by_id is None and not found:
                continue
            report.unresolved_stored += 1
            if found_by_id is None or not found:
                report.partial.append(eid)
                report.note("partial", eid, f"by id: {found_by_id is not None}, listing rows: {len(found)}")
            if len(found) > 1:
                report.duplicated.append(eid)
                report.note("duplicated", eid, f"{len(found)} listing rows (outcome unknown to the client)")
            keys = {(v.listing_id, v.day, v.occurred_at) for v in versions}
            home = [r for r in found if _key(r) in keys]
            stored = ([found_by_id] if found_by_id is not None else []) + (home if home or len(found) != 1 else found)
            if any(all(v.differences(r) for v in versions) for r in stored):
                report.conflicting.append(eid)
                report.note("conflicting", eid, "a stored row matches no version sent (outcome unknown)")

        for eid in ledger.refused:
            if eid in by_id or eid in listing_rows:
                report.unexpected.append(eid)
                report.note("unexpected", eid, "definitely refused, yet stored")
        for eid, found in listing_rows.items():
            if eid not in ledger.versions:
                report.unexpected.append(eid)
                r = found[0]
                report.note("unexpected", eid, f"never sent, stored in ({r.listing_id}, {r.day}) of the run's listings")

        if stats is not None and all_versions:
            self._check_stats(ledger, stats, stats_sample, report)
        report.seconds = time.monotonic() - started
        return report

    def _check_stats(self, ledger: Ledger, stats: StatsFn, sample: int | None, report: Report) -> None:
        low: Counter[tuple[int, dt.date, str]] = Counter()
        high: Counter[tuple[int, dt.date, str]] = Counter()
        for version in ledger.accepted.values():
            low[version.listing_id, version.day, version.type] += 1
            high[version.listing_id, version.day, version.type] += 1
        for versions in ledger.unresolved.values():
            # Stored once at most, as one of its versions: each of them may add one to its own bucket.
            for key in {(v.listing_id, v.day, v.type) for v in versions}:
                high[key] += 1
        days = sorted({v.day for versions in ledger.versions.values() for v in versions})
        listings = sorted(ledger.listings)[:sample] if sample is not None else sorted(ledger.listings)
        for listing_id in listings:
            reported = stats(listing_id, days[0], days[-1])
            for day in days:
                views, bookings = reported.get(day, (0, 0))
                report.stats_checked += 1
                for kind, name, got in (("view", "views", views), ("booking", "bookings", bookings)):
                    lo, hi = low[listing_id, day, kind], high[listing_id, day, kind]
                    if not lo <= got <= hi:
                        report.stats_mismatched.append((listing_id, day.isoformat(), name, got, lo, hi))

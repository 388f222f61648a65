"""Cassandra connections and the tables the events live in.

The schema serves the two reads we have: one event by id, and one listing's events by day in time order.
Every statement an event needs is prepared here once per session; API and worker both use :class:`Store`.
The tables are made by the migrations in sluice/migrations/ (sluice/migrate.py); their columns beyond the
common ones are the event types' fields (sluice/eventtypes.py), their TTL and compaction follow
SLUICE_RETENTION_DAYS (docs/retention.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID

from cassandra import ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, ResponseFuture, Session
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.query import PreparedStatement, named_tuple_factory

from sluice.events import iso_utc_ms
from sluice.eventtypes import BY_NAME, COMMON_FIELDS, TYPE_FIELDS
from sluice.migrate import migrate, wait_for_agreement

if TYPE_CHECKING:
    from sluice.settings import Settings

log = logging.getLogger(__name__)

#: Ids per ``IN`` read: one round trip for a message's events without a coordinator fan-out that is too wide.
_IN_CHUNK = 100

#: The columns both tables share, in the order the worker binds them (after ``day``): the fields every event
#: has, each declared type's own fields (sluice/eventtypes.py), and when the API accepted the event.
EVENT_COLUMNS: Final = (*COMMON_FIELDS, *(f.name for f in TYPE_FIELDS), "accepted_at")

#: The tables events live in (both hold every event; see the migrations in sluice/migrations/).
EVENT_TABLES: Final = ("events_by_id", "events_by_listing_day")

#: ``gc_grace_seconds`` with retention: every cell carries a TTL and nothing is ever deleted or overwritten
#: with other values (first write wins, rewrites are identical), so an expired cell cannot be resurrected by
#: a replica that missed it. The grace only has to outlive hints (max_hint_window, 3 h by default): a
#: table's grace also bounds how long hints for it are kept. Without retention, Cassandra's default.
GC_GRACE_WITH_RETENTION_S: Final = 3 * 3600
GC_GRACE_DEFAULT_S: Final = 864_000
#: About this many TWCS windows hold the retention (Cassandra's guidance: 20 to 50 windows).
TWCS_WINDOWS: Final = 30
_TWCS = "org.apache.cassandra.db.compaction.TimeWindowCompactionStrategy"
_STCS = "org.apache.cassandra.db.compaction.SizeTieredCompactionStrategy"


def twcs_window(retention_days: int) -> tuple[str, int]:
    """The TWCS window (unit, size) for a retention: about 1/30 of it, in whole days, hours or minutes; one day
    when events are kept forever (as before retention existed)."""
    if not retention_days:
        return "DAYS", 1
    minutes = retention_days * 24 * 60 / TWCS_WINDOWS
    if minutes >= 24 * 60:
        return "DAYS", round(minutes / (24 * 60))
    if minutes >= 60:
        return "HOURS", round(minutes / 60)
    return "MINUTES", round(minutes)


def table_options(retention_days: int) -> dict[str, dict[str, Any]]:
    """The options of both event tables that follow from SLUICE_RETENTION_DAYS (docs/retention.md).

    With a retention, both tables use TWCS: every cell's write timestamp is its event's time and it expires
    ``retention`` after that same time, so each window's SSTables expire together and are dropped whole.
    ``default_time_to_live`` is a safety net for rows written by other means: the worker sets each write's
    TTL itself, from the event's time. Without a retention, nothing expires: by-id keeps size-tiered
    compaction (TWCS without expiry would leave one SSTable per window forever for every point read)."""
    unit, size = twcs_window(retention_days)
    twcs = {"class": _TWCS, "compaction_window_unit": unit, "compaction_window_size": str(size)}
    by_id_compaction = twcs if retention_days else {"class": _STCS}
    shared = {
        "default_time_to_live": retention_days * 86_400,
        "gc_grace_seconds": GC_GRACE_WITH_RETENTION_S if retention_days else GC_GRACE_DEFAULT_S,
    }
    return {
        "events_by_id": {**shared, "compaction": by_id_compaction},
        "events_by_listing_day": {**shared, "compaction": twcs},
    }


def _differs(wanted: dict[str, Any], current: Any) -> bool:
    for name, value in wanted.items():
        have = getattr(current, name)
        if isinstance(value, dict):
            have = dict(have or {})
            if any(str(have.get(k)).rsplit(".", 1)[-1] != v.rsplit(".", 1)[-1] for k, v in value.items()):
                return True
        elif have != value:
            return True
    return False


def apply_retention(session: Session, keyspace: str, retention_days: int) -> list[str]:
    """Set the tables' retention options where they differ; the tables altered.

    Not a migration: the values follow a setting, not the code, and ALTERing a table to the options it has is
    idempotent, so two processes doing it at once agree."""
    altered = []
    for table, wanted in table_options(retention_days).items():
        current = session.execute(
            "SELECT default_time_to_live, gc_grace_seconds, compaction FROM system_schema.tables"
            " WHERE keyspace_name = %s AND table_name = %s",
            (keyspace, table),
            timeout=60,
        ).one()
        if current is None or not _differs(wanted, current):
            continue
        compaction = "{" + ", ".join(f"'{k}': '{v}'" for k, v in wanted["compaction"].items()) + "}"
        session.execute(
            f"ALTER TABLE {keyspace}.{table} WITH default_time_to_live = {wanted['default_time_to_live']}"
            f" AND gc_grace_seconds = {wanted['gc_grace_seconds']} AND compaction = {compaction}",
            timeout=60,
        )
        altered.append(table)
    return altered


def ttl_s(timestamp_us: int, retention_s: int, now_us: int) -> int:
    """The TTL of a write so that its cells expire ``retention_s`` after the event's time (its write timestamp,
    see :func:`write_timestamp_us`), not after the write: 0 (no TTL) without a retention.

    Rounded up, so an event never expires early; at least 1 s (0 would mean *no* TTL): an event accepted
    just inside the retention and written after it ran out lives one second."""
    if not retention_s:
        return 0
    return max(1, -((now_us - timestamp_us - retention_s * 1_000_000) // 1_000_000))


@functools.lru_cache(maxsize=64)
def _row_class(columns: tuple[str, ...]) -> Any:
    # The driver's own class for these columns (its name cleaning and fallbacks), taken from a one-row result.
    return type(named_tuple_factory(list(columns), [tuple(range(len(columns)))])[0])


def row_factory(columns: list[str], rows: list[tuple[Any, ...]]) -> list[Any]:
    """Rows as named tuples, as the driver's default factory makes them, but with one class per column list:
    the driver builds a new namedtuple class for every result set, which cost a worker 2 % of its CPU at
    1,000 single events/s (one read per run)."""
    row = _row_class(tuple(columns))
    return [row(*values) for values in rows]


def connect(settings: Settings, *, keyspace: str | None = None) -> tuple[Cluster, Session]:
    """A cluster and session configured from settings; blocking, so call it off the event loop."""
    lb_policy = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.cassandra_local_dc))
    profile = ExecutionProfile(
        load_balancing_policy=lb_policy,
        consistency_level=getattr(ConsistencyLevel, settings.cassandra_consistency),
        request_timeout=settings.cassandra_request_timeout_s,
        row_factory=row_factory,
    )
    auth = None
    if settings.cassandra_username and settings.cassandra_password:
        auth = PlainTextAuthProvider(settings.cassandra_username, settings.cassandra_password.get_secret_value())
    cluster = Cluster(
        contact_points=settings.cassandra_contact_points,
        port=settings.cassandra_port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        auth_provider=auth,
        protocol_version=settings.cassandra_protocol_version,
        reconnection_policy=ExponentialReconnectionPolicy(base_delay=0.5, max_delay=10.0),
        connect_timeout=5,
        control_connection_timeout=5,
    )
    try:
        session = cluster.connect(keyspace)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, session


def apply_schema(session: Session, settings: Settings) -> None:
    """Bring the keyspace to the newest migration (sluice/migrate.py), then set the options that follow from
    SLUICE_RETENTION_DAYS; every node agrees on the schema when this returns."""
    applied = migrate(session, settings.cassandra_keyspace, settings.cassandra_replication)
    if applied:
        log.info("applied migrations %s to keyspace %s", applied, settings.cassandra_keyspace)
    if apply_retention(session, settings.cassandra_keyspace, settings.retention_days):
        wait_for_agreement(session)


def write_timestamp_us(occurred_at: dt.datetime) -> int:
    """The write timestamp for an event's cells: derived from the event, never from the clock.

    A redelivered task then writes byte-identical cells with the same timestamp, so a retry (even after an
    ambiguous write timeout) can never make a second version of the event.
    """
    return int(occurred_at.timestamp() * 1_000_000)


class UnknownEventType(ValueError):
    """A stored row's type is not in this release's registry (a newer release wrote it, or a bug)."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back from Cassandra: the fields every event has, and its type's own (as the driver
    read them; None where a column is unset)."""

    event_id: UUID
    type: str
    listing_id: int
    user_id: int
    occurred_at: dt.datetime
    accepted_at: dt.datetime | None
    fields: dict[str, Any]

    def queued_form(self) -> dict[str, Any]:
        """The stored event in the queued form (sluice.events.queued_form), to compare with a new version."""
        out = self.as_json()
        del out["accepted_at"]
        return out

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": str(self.event_id),
            "type": self.type,
            "listing_id": self.listing_id,
            "user_id": self.user_id,
            "occurred_at": iso_utc_ms(self.occurred_at),
        }
        for f in BY_NAME[self.type].fields:  # _stored() checked the type
            value = self.fields[f.name]
            out[f.name] = None if value is None else f.kind.dump(value)
        out["accepted_at"] = iso_utc_ms(self.accepted_at) if self.accepted_at else None
        return out


class Store:
    """Prepared statements over one session. One per process; never shared across a fork."""

    def __init__(self, cluster: Cluster, session: Session, keyspace: str, *, retention_days: int = 0) -> None:
        self.cluster = cluster
        self.session = session
        self.keyspace = keyspace
        #: How long after its event time an event is kept (0: forever); each write's TTL follows from it.
        self.retention_s = retention_days * 86_400
        cols = ", ".join(EVENT_COLUMNS)
        marks = ", ".join("?" for _ in EVENT_COLUMNS)
        # The TTL is bound per write (see ttl_s): it counts from the event's time, like the write timestamp.
        self.insert_by_listing: PreparedStatement = session.prepare(
            f"INSERT INTO {keyspace}.events_by_listing_day (day, {cols}) VALUES (?, {marks})"
            " USING TIMESTAMP ? AND TTL ?"
        )
        self.insert_by_id: PreparedStatement = session.prepare(
            f"INSERT INTO {keyspace}.events_by_id (day, {cols}) VALUES (?, {marks}) USING TIMESTAMP ? AND TTL ?"
        )
        self.select_by_id: PreparedStatement = session.prepare(
            f"SELECT {cols} FROM {keyspace}.events_by_id WHERE event_id = ?"
        )
        # What is stored of several events at once (the worker's first-write-wins check before it writes).
        self.select_many_by_id: PreparedStatement = session.prepare(
            f"SELECT {cols} FROM {keyspace}.events_by_id WHERE event_id IN ?"
        )
        self.select_many_by_id.is_idempotent = True
        self.select_release: PreparedStatement = session.prepare("SELECT release_version FROM system.local")
        self.select_write_time: PreparedStatement = session.prepare(
            f"SELECT writetime(type) AS written FROM {keyspace}.events_by_id WHERE event_id = ?"
        )
        # One day of one listing, in time order, between two (occurred_at, event_id) positions: the first
        # page of a day starts at its lower bound inclusive, later pages just after the last row returned.
        page = (
            f"SELECT {cols} FROM {keyspace}.events_by_listing_day WHERE listing_id = ? AND day = ?"
            " AND (occurred_at, event_id) {op} (?, ?) AND (occurred_at, event_id) < (?, ?) LIMIT ?"
        )
        self.select_day_from: PreparedStatement = session.prepare(page.format(op=">="))
        self.select_day_after: PreparedStatement = session.prepare(page.format(op=">"))
        # Counting rows (never Cassandra counters): exact however often a message was redelivered.
        self.count_day_type: PreparedStatement = session.prepare(
            f"SELECT COUNT(*) AS n FROM {keyspace}.events_by_listing_day"
            " WHERE listing_id = ? AND day = ? AND type = ? ALLOW FILTERING"
        )
        # Reads of a single row must be idempotent for the driver to retry them on another node.
        self.select_by_id.is_idempotent = True
        self.insert_by_id.is_idempotent = True
        self.insert_by_listing.is_idempotent = True

    @classmethod
    def open(cls, settings: Settings) -> Store:
        cluster, session = connect(settings)
        try:
            return cls(cluster, session, settings.cassandra_keyspace, retention_days=settings.retention_days)
        except BaseException:
            cluster.shutdown()
            raise

    def close(self) -> None:
        self.cluster.shutdown()

    async def get_event(self, event_id: UUID) -> StoredEvent | None:
        rows = await aresult(self.session.execute_async(self.select_by_id, (event_id,)))
        if not rows:
            return None
        return _stored(rows[0])

    def stored_versions(self, event_ids: Sequence[UUID], concurrency: int = 16) -> dict[UUID, StoredEvent]:
        """What is stored of these events (blocking; the worker's side), by id; raises if a read fails."""
        chunks = [list(event_ids[i : i + _IN_CHUNK]) for i in range(0, len(event_ids), _IN_CHUNK)]
        results = execute_concurrent_with_args(
            self.session, self.select_many_by_id, [(chunk,) for chunk in chunks], concurrency=concurrency
        )
        found: dict[UUID, StoredEvent] = {}
        for ok, rows in results:
            if not ok:
                raise rows
            for row in rows:
                found[row.event_id] = _stored(row)
        return found

    async def write_time(self, event_id: UUID) -> dt.datetime | None:
        """Cassandra's write time of the event's cells (derived from occurred_at: see write_timestamp_us)."""
        rows = await aresult(self.session.execute_async(self.select_write_time, (event_id,)))
        if not rows or rows[0].written is None:
            return None
        return dt.datetime.fromtimestamp(rows[0].written / 1_000_000, dt.UTC)

    async def listing_day(
        self, listing_id: int, day: dt.date, after: tuple[dt.datetime, UUID], before: tuple[dt.datetime, UUID],
        limit: int, *, inclusive: bool,
    ) -> list[StoredEvent]:  # fmt: skip
        statement = self.select_day_from if inclusive else self.select_day_after
        params = (listing_id, day, after[0], after[1], before[0], before[1], limit)
        rows = await aresult(self.session.execute_async(statement, params))
        return [_stored(row) for row in rows]

    async def count_day(self, listing_id: int, day: dt.date, kind: str) -> int:
        rows = await aresult(self.session.execute_async(self.count_day_type, (listing_id, day, kind)))
        return int(rows[0].n)

    async def ping(self) -> str:
        rows = await aresult(self.session.execute_async(self.select_release, timeout=2.0))
        return str(rows[0].release_version)


def _stored(row: Any) -> StoredEvent:
    kind = BY_NAME.get(row.type)
    if kind is None:
        # Counting it as some other type, or dropping its fields, would be silently wrong: refuse the row.
        raise UnknownEventType(
            f"event {row.event_id} is stored with type {row.type!r}, which this release does not know"
        )
    fields = {name: getattr(row, name) for name in kind.field_names}
    return StoredEvent(row.event_id, row.type, row.listing_id, row.user_id, row.occurred_at, row.accepted_at, fields)


def aresult(future: ResponseFuture) -> asyncio.Future[list[Any]]:
    """Bridge a driver future (resolved on the driver's I/O thread) to the running asyncio loop."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[list[Any]] = loop.create_future()

    def ok(rows: Any) -> None:
        loop.call_soon_threadsafe(_set, out, list(rows) if rows is not None else [], None)

    def err(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_set, out, None, exc)

    future.add_callbacks(ok, err)
    return out


def _set(fut: asyncio.Future[list[Any]], value: list[Any] | None, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value or [])

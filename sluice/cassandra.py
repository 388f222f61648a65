"""Cassandra connections and the tables the events live in.

The schema serves the two reads we have: one event by id, and one listing's events by day in time order.
Every statement an event needs is prepared here once per session; API and worker both use :class:`Store`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID

from cassandra import ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, ResponseFuture, Session
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.query import PreparedStatement
from cassandra.util import Date

from sluice.events import iso_utc_ms

if TYPE_CHECKING:
    from sluice.settings import Settings

log = logging.getLogger(__name__)

#: Ids per ``IN`` read: one round trip for a message's events without a coordinator fan-out that is too wide.
_IN_CHUNK = 100

EVENT_COLUMNS: Final = (
    "event_id",
    "type",
    "listing_id",
    "user_id",
    "occurred_at",
    "check_in",
    "check_out",
    "guests",
    "total_price",
    "currency",
    "accepted_at",
)


def schema_statements(keyspace: str, replication: dict[str, str | int]) -> list[str]:
    """CQL that creates the keyspace and tables; idempotent (``IF NOT EXISTS``) so it can be re-run."""
    replication_cql = "{" + ", ".join(f"'{k}': '{v}'" for k, v in replication.items()) + "}"
    columns = """
        type text,
        user_id bigint,
        check_in date,
        check_out date,
        guests int,
        total_price decimal,
        currency text,
        accepted_at timestamp"""
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication_cql}",
        # Written last for each event: its presence means the event is fully stored.
        f"""CREATE TABLE IF NOT EXISTS {keyspace}.events_by_id (
        event_id uuid PRIMARY KEY,
        listing_id bigint,
        occurred_at timestamp,
        day date,{columns}
        )""",
        # One partition per listing and UTC day keeps partitions bounded and a day's events in time order.
        f"""CREATE TABLE IF NOT EXISTS {keyspace}.events_by_listing_day (
        listing_id bigint,
        day date,
        occurred_at timestamp,
        event_id uuid,{columns},
        PRIMARY KEY ((listing_id, day), occurred_at, event_id)
        ) WITH CLUSTERING ORDER BY (occurred_at ASC, event_id ASC)
          AND compaction = {{'class': 'TimeWindowCompactionStrategy',
                             'compaction_window_unit': 'DAYS', 'compaction_window_size': 1}}""",
    ]


def connect(settings: Settings, *, keyspace: str | None = None) -> tuple[Cluster, Session]:
    """A cluster and session configured from settings; blocking, so call it off the event loop."""
    lb_policy = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.cassandra_local_dc))
    profile = ExecutionProfile(
        load_balancing_policy=lb_policy,
        consistency_level=getattr(ConsistencyLevel, settings.cassandra_consistency),
        request_timeout=settings.cassandra_request_timeout_s,
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
    for statement in schema_statements(settings.cassandra_keyspace, settings.cassandra_replication):
        session.execute(statement, timeout=60)
    # Wait until every node agrees on the schema before anyone prepares statements against it.
    if not session.cluster.control_connection.wait_for_schema_agreement(wait_time=60):
        raise RuntimeError("Cassandra nodes did not reach schema agreement within 60 s")


def write_timestamp_us(occurred_at: dt.datetime) -> int:
    """The write timestamp for an event's cells: derived from the event, never from the clock.

    A redelivered task then writes byte-identical cells with the same timestamp, so a retry (even after an
    ambiguous write timeout) can never make a second version of the event.
    """
    return int(occurred_at.timestamp() * 1_000_000)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back from Cassandra."""

    event_id: UUID
    type: str
    listing_id: int
    user_id: int
    occurred_at: dt.datetime
    accepted_at: dt.datetime | None
    check_in: dt.date | None
    check_out: dt.date | None
    guests: int | None
    total_price: Decimal | None
    currency: str | None

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
        if self.type == "booking":
            out |= {
                "check_in": self.check_in.isoformat() if self.check_in else None,
                "check_out": self.check_out.isoformat() if self.check_out else None,
                "guests": self.guests,
                "total_price": str(self.total_price) if self.total_price is not None else None,
                "currency": self.currency,
            }
        out["accepted_at"] = iso_utc_ms(self.accepted_at) if self.accepted_at else None
        return out


class Store:
    """Prepared statements over one session. One per process; never shared across a fork."""

    def __init__(self, cluster: Cluster, session: Session, keyspace: str) -> None:
        self.cluster = cluster
        self.session = session
        self.keyspace = keyspace
        cols = ", ".join(EVENT_COLUMNS)
        marks = ", ".join("?" for _ in EVENT_COLUMNS)
        self.insert_by_listing: PreparedStatement = session.prepare(
            f"INSERT INTO {keyspace}.events_by_listing_day (day, {cols}) VALUES (?, {marks}) USING TIMESTAMP ?"
        )
        self.insert_by_id: PreparedStatement = session.prepare(
            f"INSERT INTO {keyspace}.events_by_id (day, {cols}) VALUES (?, {marks}) USING TIMESTAMP ?"
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
            return cls(cluster, session, settings.cassandra_keyspace)
        except BaseException:
            cluster.shutdown()
            raise

    def close(self) -> None:
        self.cluster.shutdown()

    async def get_event(self, event_id: UUID) -> StoredEvent | None:
        rows = await aresult(self.session.execute_async(self.select_by_id, (event_id,)))
        if not rows:
            return None
        values = {name: getattr(rows[0], name) for name in EVENT_COLUMNS}
        return _stored(values)

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
                found[row.event_id] = _stored({name: getattr(row, name) for name in EVENT_COLUMNS})
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
        return [_stored({name: getattr(row, name) for name in EVENT_COLUMNS}) for row in rows]

    async def count_day(self, listing_id: int, day: dt.date, kind: str) -> int:
        rows = await aresult(self.session.execute_async(self.count_day_type, (listing_id, day, kind)))
        return int(rows[0].n)

    async def ping(self) -> str:
        rows = await aresult(self.session.execute_async(self.select_release, timeout=2.0))
        return str(rows[0].release_version)


def _stored(values: dict[str, Any]) -> StoredEvent:
    for name in ("check_in", "check_out"):
        # The driver's own Date type (it also holds days outside Python's range) -> datetime.date.
        if isinstance(values[name], Date):
            values[name] = values[name].date()
    return StoredEvent(**values)


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

"""Writing a batch of events to Cassandra: first write wins, values serialized once, batched per replica.

Each event is written to ``events_by_listing_day`` first and to ``events_by_id`` last, so an event that can
be read by id is fully stored. Every cell carries a write timestamp derived from the event itself, which
makes a rewrite after a redelivery or an ambiguous timeout byte-identical: no second row, no changed cell.

Before writing, the events' ``events_by_id`` rows are read (one ``IN`` query per 100 ids): an event already
stored with the same content is done (a redelivery: nothing is written again), and one stored with other
content is a **conflict**: the first version stays, the new one is not written anywhere (so both tables
keep agreeing, listing reads show the event once, and stats count it once). The API refuses a second version
while the first is queued (409); this check covers a second version that arrives after the first is stored.

Events arrive in their queued form (:func:`sluice.events.queued_form`). A message the API built says so, and
its events are trusted: :func:`parse_queued` only checks their shape and types while it converts them (no
model validation per event); anything else goes through the full model (see worker/tasks.py).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import InvalidOperation
from typing import Any, Final

from cassandra.concurrent import execute_concurrent
from cassandra.query import UNSET_VALUE, BatchStatement, BatchType, BoundStatement, PreparedStatement

from sluice.cassandra import Store, ttl_s, write_timestamp_us
from sluice.events import fingerprint
from sluice.eventtypes import layouts
from worker.binding import RowBinder

#: Rows per unlogged batch: about 4 KiB of views, under Cassandra's default batch size warning (5 KiB).
ROWS_PER_BATCH = 20


def _optional(load: Any) -> Any:
    # An optional field the client left out is queued as null, and stays unset in Cassandra.
    return lambda value: UNSET_VALUE if value is None else load(value)


@dataclass(frozen=True, slots=True)
class _Shape:
    """How one event type's queued form becomes its columns (from sluice/eventtypes.py)."""

    name: str
    keys: frozenset[str]
    #: The type's own fields and how each queued value converts to the value bound.
    loads: tuple[tuple[str, Any], ...]
    #: The other types' columns before and after this type's run: left *unset* (protocol v4+), not written
    #: as nulls, which would write a cell tombstone per column for compaction to carry and reads to skip.
    before: tuple[Any, ...]
    after: tuple[Any, ...]


_SHAPES: Final = {
    name: _Shape(
        name,
        layout.keys,
        tuple((f.name, f.kind.load if f.required else _optional(f.kind.load)) for f in layout.kind.fields),
        (UNSET_VALUE,) * layout.before,
        (UNSET_VALUE,) * layout.after,
    )
    for name, layout in layouts().items()
}


@dataclass(slots=True)
class Row:
    """One event, ready to write: its queued form, and the column values of both tables (``day``, then
    :data:`sluice.cassandra.EVENT_COLUMNS` up to the last type's fields)."""

    event_id: uuid.UUID
    type: str
    queued: dict[str, Any]
    values: tuple[Any, ...]
    timestamp_us: int
    #: When the API acknowledged it (the ``accepted_at`` column); None: the writer's default for the call.
    accepted_at: dt.datetime | None = None

    @property
    def id(self) -> str:
        return str(self.queued["event_id"])


def parse_queued(raw: Any, accepted_at: dt.datetime | None = None) -> Row | None:
    """A row from an event in its exact queued form, or None if it is not one (then validate it fully).

    Checks shape and types only: the API validated the event before it queued it."""
    if type(raw) is not dict:
        return None
    kind = raw.get("type")
    shape = _SHAPES.get(kind) if type(kind) is str else None
    if shape is None or raw.keys() != shape.keys:
        return None
    event_id, listing_id, user_id, occurred_text = (
        raw["event_id"],
        raw["listing_id"],
        raw["user_id"],
        raw["occurred_at"],
    )
    if type(listing_id) is not int or type(user_id) is not int or type(event_id) is not str:
        return None
    # Exactly the queued form, 2026-11-25T08:30:00.250Z: anything else goes through the model.
    if type(occurred_text) is not str or len(occurred_text) != 24 or occurred_text[-1] != "Z":
        return None
    try:
        uid = uuid.UUID(event_id)
        occurred = dt.datetime.fromisoformat(occurred_text)
        own = [load(raw[name]) for name, load in shape.loads]
    except (ValueError, TypeError, InvalidOperation):
        return None
    values = (occurred.date(), uid, shape.name, listing_id, user_id, occurred, *shape.before, *own, *shape.after)
    return Row(uid, shape.name, raw, values, write_timestamp_us(occurred), accepted_at)


@dataclass
class WriteOutcome:
    """What became of each event of a write: stored (now or before), a conflict, or failed (retry it)."""

    stored: list[Row] = field(default_factory=list)
    conflicts: list[Row] = field(default_factory=list)
    failed: list[tuple[Row, Exception]] = field(default_factory=list)


class EventWriter:
    def __init__(self, store: Store, concurrency: int) -> None:
        self.store = store
        self.concurrency = concurrency
        self._by_listing = RowBinder(store.insert_by_listing)

    def write(self, rows: Sequence[Row], accepted_at: dt.datetime | None = None) -> WriteOutcome:
        """Store the events unless another version is stored; safe to call again with any of them.
        ``accepted_at`` is for rows that carry none (rows of several messages each carry their message's).

        One failing batch does not fail the others: only the events of failed batches need a retry."""
        outcome = WriteOutcome()
        if not rows:
            return outcome
        try:
            stored = self.store.stored_versions([row.event_id for row in rows])
        except Exception as exc:  # noqa: BLE001 - the read failed: every event needs a retry
            outcome.failed = [(row, exc) for row in rows]
            return outcome
        todo: list[Row] = []
        for row in rows:
            existing = stored.get(row.event_id)
            if existing is None:
                todo.append(row)
            elif fingerprint(existing.queued_form()) == fingerprint(row.queued):
                outcome.stored.append(row)
            else:
                outcome.conflicts.append(row)
        failed = self.write_rows(todo, accepted_at)
        outcome.stored += [row for index, row in enumerate(todo) if index not in failed]
        outcome.failed = [(todo[index], error) for index, error in sorted(failed.items())]
        return outcome

    def write_rows(self, rows: Sequence[Row], accepted_at: dt.datetime | None = None) -> dict[int, Exception]:
        """Write the rows to both tables, without the first-write-wins read (the bench's ceiling calls this
        directly); returns the failed rows' indexes and their errors."""
        if not rows:
            return {}
        # Both tables take the same values in the same order: serialize each row once, for both statements.
        # Each row's TTL counts from its event's time (sluice.cassandra.ttl_s): 0, no TTL, without retention.
        bind, retention_s, now_us = self._by_listing.bind, self.store.retention_s, time.time_ns() // 1000
        by_listing = [
            bind(
                (
                    *row.values,
                    row.accepted_at or accepted_at,
                    row.timestamp_us,
                    ttl_s(row.timestamp_us, retention_s, now_us),
                )
            )
            for row in rows
        ]
        by_id = [_rebind(self.store.insert_by_id, bound) for bound in by_listing]
        # Phase 1: the listing-and-day rows. Phase 2: the by-id rows, only for events whose listing row is in,
        # so an event readable by id is fully stored.
        failed = self._write_phase(by_listing, range(len(rows)))
        failed |= self._write_phase(by_id, [index for index in range(len(rows)) if index not in failed])
        return failed

    def _write_phase(self, bound: list[BoundStatement], indexes: Iterable[int]) -> dict[int, Exception]:
        """Write ``bound[i]`` for each index, as unlogged batches of rows that share a replica.

        Every row costs the Python driver a request of its own unless rows travel together, and that cost,
        not Cassandra, bounds a worker process. Rows are grouped by the node that owns them (token-aware),
        so each batch goes to one replica and is applied there without coordinator fan-out; chunks stay
        small enough for Cassandra's batch size warning. A replica's rows are ordered partition by partition
        (a listing's rows of a day share one): Cassandra applies a batch as one mutation per partition, so
        rows of one partition in one batch cost it one mutation, not one each. The failed rows' indexes map
        to their error."""
        metadata = self.store.cluster.metadata
        keyspace = self.store.keyspace
        by_key: dict[bytes, list[int]] = defaultdict(list)
        for index in indexes:
            by_key[bound[index].routing_key].append(index)
        by_replica: dict[Any, list[int]] = defaultdict(list)
        for key, members in by_key.items():  # one replica lookup per partition, not per row
            replicas = metadata.get_replicas(keyspace, key)
            by_replica[replicas[0] if replicas else None].extend(members)
        groups: list[list[int]] = []
        requests: list[tuple[Any, Any]] = []
        for members in by_replica.values():
            for start in range(0, len(members), ROWS_PER_BATCH):
                chunk = members[start : start + ROWS_PER_BATCH]
                groups.append(chunk)
                if len(chunk) == 1:
                    requests.append((bound[chunk[0]], None))
                    continue
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for index in chunk:
                    batch.add(bound[index])
                requests.append((batch, None))
        results = execute_concurrent(
            self.store.session, requests, concurrency=self.concurrency, raise_on_first_error=False
        )
        failed: dict[int, Exception] = {}
        for group, (ok, outcome) in zip(groups, results, strict=True):
            if not ok:
                failed.update(dict.fromkeys(group, outcome))
        return failed


def _rebind(statement: PreparedStatement, serialized: BoundStatement) -> BoundStatement:
    """``statement`` bound to the values ``serialized`` already holds (same columns, same order)."""
    bound = BoundStatement(statement)
    bound.values = serialized.values
    bound.raw_values = serialized.raw_values
    return bound

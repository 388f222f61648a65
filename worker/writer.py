"""Writing a batch of validated events to Cassandra: first write wins, batched per replica, bounded concurrency.

Each event is written to ``events_by_listing_day`` first and to ``events_by_id`` last, so an event that can
be read by id is fully stored. Every cell carries a write timestamp derived from the event itself, which
makes a rewrite after a redelivery or an ambiguous timeout byte-identical: no second row, no changed cell.

Before writing, the events' ``events_by_id`` rows are read (one ``IN`` query per 100 ids): an event already
stored with the same content is done (a redelivery: nothing is written again), and one stored with other
content is a **conflict**: the first version stays, the new one is not written anywhere (so both tables
keep agreeing, listing reads show the event once, and stats count it once). The API refuses a second version
while the first is queued (409); this check covers a second version that arrives after the first is stored.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from cassandra.concurrent import execute_concurrent
from cassandra.query import UNSET_VALUE, BatchStatement, BatchType, BoundStatement, PreparedStatement

from sluice.cassandra import Store, write_timestamp_us
from sluice.events import BookingEvent, ViewEvent, fingerprint, queued_form

#: Rows per unlogged batch: about 4 KiB of views, under Cassandra's default batch size warning (5 KiB).
ROWS_PER_BATCH = 20


#: A view has no booking columns: they are left *unset* (protocol v4+), not written as nulls, which would
#: write five cell tombstones per view for compaction to carry and reads to skip.
_NO_BOOKING = (UNSET_VALUE,) * 5


def row_params(event: ViewEvent | BookingEvent, accepted_at: dt.datetime) -> tuple[Any, ...]:
    """Values in the order of :data:`sluice.cassandra.EVENT_COLUMNS`, after ``day`` and before the timestamp."""
    occurred = event.occurred_at.astimezone(dt.UTC)
    if isinstance(event, BookingEvent):
        stay = (event.check_in, event.check_out, event.guests, Decimal(event.total_price), event.currency)
    else:
        stay = _NO_BOOKING
    return (
        occurred.date(),
        event.event_id,
        event.type,
        event.listing_id,
        event.user_id,
        occurred,
        *stay,
        accepted_at,
        write_timestamp_us(occurred),
    )


@dataclass
class WriteOutcome:
    """What became of each event of a write: stored (now or before), a conflict, or failed (retry it)."""

    stored: list[ViewEvent | BookingEvent] = field(default_factory=list)
    conflicts: list[ViewEvent | BookingEvent] = field(default_factory=list)
    failed: list[tuple[ViewEvent | BookingEvent, Exception]] = field(default_factory=list)


class EventWriter:
    def __init__(self, store: Store, concurrency: int) -> None:
        self.store = store
        self.concurrency = concurrency

    def write(self, events: Sequence[ViewEvent | BookingEvent], accepted_at: dt.datetime) -> WriteOutcome:
        """Store the events unless another version is stored; safe to call again with any of them.

        One failing batch does not fail the others: only the events of failed batches need a retry."""
        outcome = WriteOutcome()
        if not events:
            return outcome
        try:
            stored = self.store.stored_versions([event.event_id for event in events])
        except Exception as exc:  # noqa: BLE001 - the read failed: every event needs a retry
            outcome.failed = [(event, exc) for event in events]
            return outcome
        todo: list[ViewEvent | BookingEvent] = []
        for event in events:
            existing = stored.get(event.event_id)
            if existing is None:
                todo.append(event)
            elif fingerprint(existing.queued_form()) == fingerprint(queued_form(event)):
                outcome.stored.append(event)
            else:
                outcome.conflicts.append(event)
        failed = self._write(todo, accepted_at)
        failed_ids = {id(event) for event, _ in failed}
        outcome.stored += [event for event in todo if id(event) not in failed_ids]
        outcome.failed = failed
        return outcome

    def _write(
        self, events: Sequence[ViewEvent | BookingEvent], accepted_at: dt.datetime
    ) -> list[tuple[ViewEvent | BookingEvent, Exception]]:
        if not events:
            return []
        rows = [row_params(event, accepted_at) for event in events]
        # Phase 1: the listing-and-day rows. Phase 2: the by-id rows, only for events whose listing row is in,
        # so an event readable by id is fully stored.
        failed = self._write_phase(self.store.insert_by_listing, rows, range(len(rows)))
        remaining = [index for index in range(len(rows)) if index not in failed]
        failed |= self._write_phase(self.store.insert_by_id, rows, remaining)
        return [(events[index], error) for index, error in sorted(failed.items())]

    def _write_phase(
        self, statement: PreparedStatement, rows: list[tuple[Any, ...]], indexes: Iterable[int]
    ) -> dict[int, Exception]:
        """Write ``rows[i]`` for each index, as unlogged batches of rows that share a replica.

        Every row costs the Python driver a request of its own unless rows travel together, and that cost,
        not Cassandra, bounds a worker process. Rows are grouped by the node that owns them (token-aware),
        so each batch goes to one replica and is applied there without coordinator fan-out; chunks stay
        small enough for Cassandra's batch size warning. The failed rows' indexes map to their error.
        """
        metadata = self.store.cluster.metadata
        keyspace = self.store.keyspace
        by_replica: dict[Any, list[tuple[int, BoundStatement]]] = defaultdict(list)
        for index in indexes:
            bound = statement.bind(rows[index])
            replicas = metadata.get_replicas(keyspace, bound.routing_key)
            by_replica[replicas[0] if replicas else None].append((index, bound))
        groups: list[list[int]] = []
        requests: list[tuple[Any, Any]] = []
        for members in by_replica.values():
            for start in range(0, len(members), ROWS_PER_BATCH):
                chunk = members[start : start + ROWS_PER_BATCH]
                groups.append([index for index, _ in chunk])
                if len(chunk) == 1:
                    requests.append((chunk[0][1], None))
                    continue
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for _, bound in chunk:
                    batch.add(bound)
                requests.append((batch, None))
        results = execute_concurrent(
            self.store.session, requests, concurrency=self.concurrency, raise_on_first_error=False
        )
        failed: dict[int, Exception] = {}
        for group, (ok, outcome) in zip(groups, results, strict=True):
            if not ok:
                failed.update(dict.fromkeys(group, outcome))
        return failed

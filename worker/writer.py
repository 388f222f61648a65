"""Writing a batch of validated events to Cassandra: batched per partition, with bounded concurrency.

Each event is written to ``events_by_listing_day`` first and to ``events_by_id`` last, so an event that can
be read by id is fully stored. Every cell carries a write timestamp derived from the event itself, which
makes a rewrite after a redelivery or an ambiguous timeout byte-identical: no second row, no changed cell.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType, BoundStatement, PreparedStatement

from sluice.cassandra import Store, write_timestamp_us
from sluice.events import BookingEvent, ViewEvent

#: Rows per unlogged batch: about 4 KiB of views, under Cassandra's default batch size warning (5 KiB).
ROWS_PER_BATCH = 20


def row_params(event: ViewEvent | BookingEvent, accepted_at: dt.datetime) -> tuple[Any, ...]:
    """Values in the order of :data:`sluice.cassandra.EVENT_COLUMNS`, after ``day`` and before the timestamp."""
    occurred = event.occurred_at.astimezone(dt.UTC)
    booking = event if isinstance(event, BookingEvent) else None
    return (
        occurred.date(),
        event.event_id,
        event.type,
        event.listing_id,
        event.user_id,
        occurred,
        booking.check_in if booking else None,
        booking.check_out if booking else None,
        booking.guests if booking else None,
        Decimal(booking.total_price) if booking else None,
        booking.currency if booking else None,
        accepted_at,
        write_timestamp_us(occurred),
    )


class EventWriter:
    def __init__(self, store: Store, concurrency: int) -> None:
        self.store = store
        self.concurrency = concurrency

    def write(
        self, events: Sequence[ViewEvent | BookingEvent], accepted_at: dt.datetime
    ) -> list[tuple[ViewEvent | BookingEvent, Exception]]:
        """Store the events; returns those that failed, with the error. Safe to call again with any of them.

        One failing batch does not fail the others: only the events of failed batches need a retry.
        """
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

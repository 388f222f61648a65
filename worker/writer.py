"""Writing a batch of validated events to Cassandra: batched per partition, with bounded concurrency.

Each event is written to ``events_by_listing_day`` first and to ``events_by_id`` last, so an event that can
be read by id is fully stored. Every cell carries a write timestamp derived from the event itself, which
makes a rewrite after a redelivery or an ambiguous timeout byte-identical: no second row, no changed cell.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from cassandra.concurrent import execute_concurrent, execute_concurrent_with_args
from cassandra.query import BatchStatement, BatchType

from sluice.cassandra import Store, write_timestamp_us
from sluice.events import BookingEvent, ViewEvent

#: Rows of one partition per unlogged batch: single-partition batches are applied atomically and cheaply,
#: and this keeps them well under Cassandra's batch size warning (5 KiB).
ROWS_PER_BATCH = 16


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

    def write(self, events: Sequence[ViewEvent | BookingEvent], accepted_at: dt.datetime) -> None:
        """Store every event or raise; safe to call again with the same events after any failure."""
        if not events:
            return
        rows = [row_params(event, accepted_at) for event in events]
        session = self.store.session

        by_partition: dict[tuple[int, dt.date], list[tuple[Any, ...]]] = defaultdict(list)
        for row in rows:
            by_partition[(row[3], row[0])].append(row)
        statements: list[tuple[Any, Any]] = []
        for partition_rows in by_partition.values():
            if len(partition_rows) == 1:
                statements.append((self.store.insert_by_listing, partition_rows[0]))
                continue
            for start in range(0, len(partition_rows), ROWS_PER_BATCH):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for row in partition_rows[start : start + ROWS_PER_BATCH]:
                    batch.add(self.store.insert_by_listing, row)
                statements.append((batch, ()))
        execute_concurrent(session, statements, concurrency=self.concurrency, raise_on_first_error=True)
        execute_concurrent_with_args(
            session, self.store.insert_by_id, rows, concurrency=self.concurrency, raise_on_first_error=True
        )

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

    def write(
        self, events: Sequence[ViewEvent | BookingEvent], accepted_at: dt.datetime
    ) -> list[tuple[ViewEvent | BookingEvent, Exception]]:
        """Store the events; returns those that failed, with the error. Safe to call again with any of them.

        One failing event (or partition) does not fail the others: only the failures need a retry.
        """
        if not events:
            return []
        session = self.store.session
        # Phase 1: the listing-and-day rows, one unlogged batch per partition chunk.
        by_partition: dict[tuple[int, dt.date], list[int]] = defaultdict(list)
        rows = [row_params(event, accepted_at) for event in events]
        for index, row in enumerate(rows):
            by_partition[(row[3], row[0])].append(index)
        groups: list[list[int]] = []
        statements: list[tuple[Any, Any]] = []
        for indexes in by_partition.values():
            for start in range(0, len(indexes), ROWS_PER_BATCH):
                chunk = indexes[start : start + ROWS_PER_BATCH]
                groups.append(chunk)
                if len(chunk) == 1:
                    statements.append((self.store.insert_by_listing, rows[chunk[0]]))
                    continue
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for index in chunk:
                    batch.add(self.store.insert_by_listing, rows[index])
                statements.append((batch, ()))
        failed: dict[int, Exception] = {}
        results = execute_concurrent(session, statements, concurrency=self.concurrency, raise_on_first_error=False)
        for chunk, (ok, outcome) in zip(groups, results, strict=True):
            if not ok:
                failed.update(dict.fromkeys(chunk, outcome))
        # Phase 2: the by-id rows, only for events whose listing row is in.
        remaining = [index for index in range(len(rows)) if index not in failed]
        results = execute_concurrent_with_args(
            session,
            self.store.insert_by_id,
            [rows[index] for index in remaining],
            concurrency=self.concurrency,
            raise_on_first_error=False,
        )
        for index, (ok, outcome) in zip(remaining, results, strict=True):
            if not ok:
                failed[index] = outcome
        return [(events[index], error) for index, error in sorted(failed.items())]

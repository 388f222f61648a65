"""Typed helpers that build events, and the one place an event becomes the bytes the client sends.

Plain dicts are fine too; these helpers only spare the producer the field names and formats of contract v1
(README, *Events*). They do no validation beyond Python's types: the API judges each event and the client
reports its verdict, so there is one source of truth for what is valid.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson

from ._types import Event


def _timestamp(value: dt.datetime | str | None) -> str:
    if value is None:
        value = dt.datetime.now(dt.UTC)
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        # The API refuses timestamps without an offset; guessing the producer's zone would store a wrong time.
        raise ValueError("occurred_at must be timezone-aware (e.g. datetime.now(UTC))")
    return value.isoformat()


def _day(value: dt.date | str) -> str:
    return value if isinstance(value, str) else value.isoformat()


def view(
    *,
    listing_id: int,
    user_id: int,
    occurred_at: dt.datetime | str | None = None,
    event_id: UUID | str | None = None,
) -> dict[str, Any]:
    """A *view* event; ``occurred_at`` defaults to now (UTC), ``event_id`` to one ``send`` picks."""
    event: dict[str, Any] = {
        "type": "view",
        "listing_id": listing_id,
        "user_id": user_id,
        "occurred_at": _timestamp(occurred_at),
    }
    if event_id is not None:
        event["event_id"] = str(event_id)
    return event


def booking(
    *,
    listing_id: int,
    user_id: int,
    check_in: dt.date | str,
    check_out: dt.date | str,
    guests: int,
    total_price: Decimal | str,
    currency: str,
    occurred_at: dt.datetime | str | None = None,
    event_id: UUID | str | None = None,
) -> dict[str, Any]:
    """A *booking* event; ``total_price`` is a decimal (never a float: money must not round)."""
    if isinstance(total_price, float):
        raise TypeError("total_price must be a Decimal or a string such as '149.90', not a float")
    return view(listing_id=listing_id, user_id=user_id, occurred_at=occurred_at, event_id=event_id) | {
        "type": "booking",
        "check_in": _day(check_in),
        "check_out": _day(check_out),
        "guests": guests,
        "total_price": str(total_price),
        "currency": currency,
    }


def prepare(event: Event) -> tuple[UUID, dict[str, Any], bytes]:
    """The event's id (a new uuid4 if it has none), the event with that id, and its JSON bytes.

    Encoded once, here, in the caller's thread: every retry then resends exactly these bytes (same id, same
    content), and an event that is not JSON (a set, a Decimal) fails in ``send``, not later in the
    background (as does an ``event_id`` that is not a UUID: ``ValueError``). A pydantic model (e.g.
    ``sluice.events.ViewEvent``) is taken through its ``model_dump``.
    """
    data = dict(event) if isinstance(event, Mapping) else event.model_dump(mode="json")
    raw_id = data.get("event_id")
    # A malformed id is refused here rather than by the API: without a UUID the producer could not tell
    # which event a rejection is about.
    event_id = uuid.uuid4() if raw_id is None else raw_id if isinstance(raw_id, UUID) else UUID(str(raw_id))
    data["event_id"] = str(event_id)
    return event_id, data, orjson.dumps(data)

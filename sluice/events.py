"""The event model (contract v1), shared by the API that validates events and the worker that stores them.

An event arrives as parsed JSON (``dict``) and is validated one at a time, so that in a batch each event is
judged on its own. Types are strict where JSON could smuggle a wrong type past a lax parser: ``"5"`` and
``true`` are not integers, a number is not a timestamp. Unknown fields are refused, which also refuses
booking fields on a view.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeAlias
from uuid import UUID

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

#: Cassandra ``bigint`` bounds our identifiers.
_MAX_ID = 2**63 - 1


def _must_be_string(value: Any) -> Any:
    # UUIDs, timestamps and dates travel as JSON strings; refuse numbers and booleans that a lax parser
    # would turn into a date (an int is a Unix timestamp to pydantic) or a UUID.
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


#: No event, stay or booking date before this (nor timestamps that would need negative write timestamps).
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
LATEST_DAY = dt.date(2199, 12, 31)


def _in_time_range(value: dt.datetime, info: ValidationInfo) -> dt.datetime:
    # In UTC from here on (the instant is the same; the stored form is UTC anyway): comparing and formatting
    # datetimes that share dt.UTC skips a call to pydantic's offset object per operation, which took a fifth
    # of the API's CPU on batches (py-spy, 2026-11-30).
    value = value.astimezone(dt.UTC)
    if value < EARLIEST:
        raise ValueError("must not be before 2000-01-01T00:00:00Z")
    # The API passes the latest instant its clock allows; the worker, judging an event already accepted, not.
    context = info.context
    if context is not None and value > context["latest"]:
        raise ValueError(f"must not be more than {context['max_future_s']} s in the future")
    return value


def _day_in_range(value: dt.date) -> dt.date:
    if not EARLIEST.date() <= value <= LATEST_DAY:
        raise ValueError("must be between 2000-01-01 and 2199-12-31")
    return value


def _non_negative_decimal(value: str) -> str:
    if Decimal(value) < 0:  # the pattern already guarantees a plain decimal literal
        raise ValueError("must not be negative")
    return value


Identifier = Annotated[StrictInt, Field(gt=0, le=_MAX_ID)]
EventId = Annotated[UUID, BeforeValidator(_must_be_string)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_must_be_string), AfterValidator(_in_time_range)]
Day = Annotated[dt.date, BeforeValidator(_must_be_string), AfterValidator(_day_in_range)]
Price = Annotated[
    StrictStr,
    Field(pattern=r"^[0-9]{1,12}(\.[0-9]{1,4})?$", examples=["149.90"]),
    AfterValidator(_non_negative_decimal),
]
Currency = Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$", examples=["EUR"])]


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: EventId = Field(description="Chosen by the client; the idempotency key.")
    listing_id: Identifier
    user_id: Identifier
    occurred_at: Timestamp = Field(description="RFC 3339 with an offset, e.g. 2026-11-25T09:30:00Z.")


class ViewEvent(_EventBase):
    """A user viewed a listing."""

    type: Literal["view"]


class BookingEvent(_EventBase):
    """A user booked a listing."""

    type: Literal["booking"]
    check_in: Day
    check_out: Day
    guests: Annotated[StrictInt, Field(ge=1, le=50)]
    total_price: Price = Field(description="Non-negative decimal string, up to 4 decimal places.")
    currency: Currency = Field(description="ISO 4217 code, three capital letters.")

    @model_validator(mode="after")
    def _stay_is_forward(self) -> BookingEvent:
        if self.check_out <= self.check_in:
            raise ValueError("check_out must be after check_in")
        return self


Event: TypeAlias = Annotated[ViewEvent | BookingEvent, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[ViewEvent | BookingEvent] = TypeAdapter(Event)

EVENT_TYPES = ("view", "booking")


class FieldError(BaseModel):
    """One problem with one field: ``loc`` is the JSON path from the request body's root."""

    loc: list[str | int]
    msg: str
    type: str


def validate_event(
    raw: Any, loc_prefix: tuple[str | int, ...] = (), *, max_future_s: int | None = None
) -> ViewEvent | BookingEvent | list[FieldError]:
    """Validate one decoded JSON event: the event, or the list of what is wrong with it.

    ``max_future_s`` bounds how far ``occurred_at`` may lie ahead of our clock (the API sets it).
    """
    context = None
    if max_future_s is not None:
        latest = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max_future_s)
        context = {"latest": latest, "max_future_s": max_future_s}
    try:
        return EVENT_ADAPTER.validate_python(raw, context=context)
    except ValidationError as exc:
        return [_field_error(err, loc_prefix) for err in exc.errors(include_url=False, include_input=False)]


def _field_error(err: Any, loc_prefix: tuple[str | int, ...]) -> FieldError:
    loc = list(err["loc"])
    # A discriminated union puts the chosen tag ("view"/"booking") first in the path; it is not a field.
    if loc and loc[0] in EVENT_TYPES:
        loc = loc[1:]
    elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc = ["type"]  # a missing or unknown type is the "type" field's fault, not the whole event's
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    return FieldError(loc=[*loc_prefix, *loc], msg=msg, type=str(err["type"]))


def event_id_of(raw: Any) -> str | None:
    """The ``event_id`` a client sent, even for an invalid event, so it can match results to its events."""
    if isinstance(raw, dict):
        value = raw.get("event_id")
        # Echo only what could be an id: a hostile client must not get a megabyte string sent back.
        if isinstance(value, str) and len(value) <= 64 and value.isprintable():
            return value
    return None


def queued_form(event: ViewEvent | BookingEvent) -> dict[str, Any]:
    """The event as it travels on the queue and is stored: plain JSON, ``occurred_at`` in UTC at millisecond
    precision (what Cassandra keeps). Two posts that store the same row have the same queued form."""
    out = event.model_dump(mode="json")
    out["occurred_at"] = iso_utc_ms(event.occurred_at)
    return out


def iso_utc_ms(value: dt.datetime) -> str:
    """``2026-11-25T08:30:00.250Z``: UTC, milliseconds (an aware datetime, or a naive one meaning UTC)."""
    if value.tzinfo is not dt.UTC:  # validated events are in UTC already (see _in_time_range)
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return value.isoformat(timespec="milliseconds")[:-6] + "Z"


def fingerprint(queued: dict[str, Any]) -> str:
    """16 hex digits that differ when two versions of one ``event_id`` differ in anything that is stored."""
    return hashlib.blake2b(orjson.dumps(queued, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()

"""The event types, declared once: every other place that knows a type derives from :data:`REGISTRY`.

A declaration names the type, its own fields and the key ``/stats`` counts it under. Each field has a
:class:`Kind` that says, in one place, how its values look in every form they take:

- ``annotation``: the pydantic type the API validates with (strict, with its constraints);
- ``cql``: the column type in both event tables;
- ``load``: queued JSON -> the value the Cassandra driver binds (the worker's trusted fast path: it checks
  types, not ranges, and raises ``TypeError``/``ValueError`` on anything else);
- ``dump``: the value the driver reads back -> the queued JSON (so a stored event can be compared with a
  new version of it, and is returned by the read API exactly as it was queued);
- ``json_type``: the JSON type of the value in the read API's responses (its OpenAPI schema).

Each type also declares how analytics SDKs send it (Segment, RudderStack, PostHog; sluice/sdkmap.py reads it):
the event names it is sent as (``sent_as``), and, per field, where in the SDK's message its value is
(``EventField.source``, by default ``properties.<name>``; the fields every event has come from
:data:`SDK_COMMON_SOURCES`). Operators add names, and other sources, without code: ``SLUICE_SDK_EVENTS``.

From the registry come: the pydantic models and their discriminated union (sluice/events.py), the type
columns of both tables and the read-back (sluice/cassandra.py), the worker's row binding (worker/writer.py),
the ``/stats`` counters (api/routes/listings.py), the metric labels (sluice/metrics.py) and the Grafana
dashboard (sluice/dashboard.py). Adding a type is one :class:`EventType` here plus a migration that adds its
columns (sluice/migrations/); tests/test_eventtypes.py checks the migrated tables hold every declared column.

The fields every event has (``event_id``, ``type``, ``listing_id``, ``user_id``, ``occurred_at``) are not
declared per type: they are the tables' key and the model's base (sluice/events.py).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, Final

from cassandra.util import Date
from pydantic import AfterValidator, BeforeValidator, Field, StrictInt, StrictStr

#: No event, stay or booking date before this (nor timestamps that would need negative write timestamps).
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
LATEST_DAY = dt.date(2199, 12, 31)

#: Cassandra ``bigint`` bounds our identifiers; ``int`` bounds counts.
MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1


def must_be_string(value: Any) -> Any:
    # UUIDs, timestamps and dates travel as JSON strings; refuse numbers and booleans that a lax parser
    # would turn into a date (an int is a Unix timestamp to pydantic) or a UUID.
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _day_in_range(value: dt.date) -> dt.date:
    if not EARLIEST.date() <= value <= LATEST_DAY:
        raise ValueError("must be between 2000-01-01 and 2199-12-31")
    return value


def _non_negative_decimal(value: str) -> str:
    if Decimal(value) < 0:  # the pattern already guarantees a plain decimal literal
        raise ValueError("must not be negative")
    return value


@dataclass(frozen=True)
class Kind:
    """How one kind of field looks as validated input, as a column, as a bound value and as JSON."""

    annotation: Any
    cql: str
    load: Callable[[Any], Any]
    dump: Callable[[Any], Any]
    json_type: type
    #: An SDK's JSON value -> this kind's input, for values an SDK sends in another JSON type than ours (a
    #: price as a number); the validation that follows is the API's own. None: taken as sent.
    from_sdk: Callable[[Any], Any] | None = None
    #: The API's fast path (sluice.events.validate_queued): a JSON value in the plain form clients send ->
    #: ``(the value the model would hold, the queued value)``, or None for anything else, which the model then
    #: judges (with its error messages). It may send any value to the model, but must never accept one the
    #: model refuses, nor queue it in another form (tests/test_fast_path.py checks it against the model).
    fast: Callable[[Any], tuple[Any, Any] | None] = lambda _: None


def _load_int(value: Any) -> int:
    if type(value) is not int:  # bool is an int to isinstance: refuse it like the model does
        raise TypeError("not an integer")
    return value


def _load_str(value: Any) -> str:
    if type(value) is not str:
        raise TypeError("not a string")
    return value


def _load_decimal(value: Any) -> Decimal:
    return Decimal(_load_str(value))  # InvalidOperation is a ValueError


def _price_from_number(value: Any) -> Any:
    """A JSON number as the decimal it prints as: ``449.7`` -> ``"449.7"``, never the binary float's
    ``449.69999999999998863...`` (Segment's SDK turns a ``Decimal`` into a float, so this is how prices arrive).
    ``repr`` of a float is the shortest string that reads back as the same float; ``f`` formatting keeps the
    exponent forms (``1e-05``) plain, so the pattern judges them like any other literal."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value  # strings (and anything else) are validated as sent
    if isinstance(value, float) and not math.isfinite(value):
        return value
    return format(Decimal(repr(value)), "f")


def _dump_day(value: Any) -> str:
    # The driver reads a ``date`` column as its own Date type (which also holds days outside Python's range).
    return (value.date() if isinstance(value, Date) else value).isoformat()  # type: ignore[no-any-return]


def integer(*, ge: int, le: int) -> Kind:
    """A strict JSON integer (``"5"`` and ``true`` are refused) in ``ge..le``, stored as CQL ``int``
    (or ``bigint`` when the range needs it)."""

    def fast(value: Any) -> tuple[Any, Any] | None:
        return (value, value) if type(value) is int and ge <= value <= le else None

    return Kind(
        annotation=Annotated[StrictInt, Field(ge=ge, le=le)],
        cql="int" if ge >= -MAX_INT - 1 and le <= MAX_INT else "bigint",
        load=_load_int,
        dump=int,
        json_type=int,
        fast=fast,
    )


def text(*, min_length: int = 0, max_length: int) -> Kind:
    """A JSON string of ``min_length..max_length`` characters, stored as CQL ``text``."""

    def fast(value: Any) -> tuple[Any, Any] | None:
        return (value, value) if type(value) is str and min_length <= len(value) <= max_length else None

    return Kind(
        annotation=Annotated[StrictStr, Field(min_length=min_length, max_length=max_length)],
        cql="text",
        load=_load_str,
        dump=str,
        json_type=str,
        fast=fast,
    )


def _fast_matching(pattern: str, queued: Callable[[str], Any] = str) -> Callable[[Any], tuple[Any, Any] | None]:
    """A string kind's fast path: the whole string matches ``pattern`` (ASCII only, no end-of-line slack)."""
    match = re.compile(pattern, re.ASCII).fullmatch

    def fast(value: Any) -> tuple[Any, Any] | None:
        return (value, queued(value)) if type(value) is str and match(value) else None

    return fast


def _fast_day(value: Any) -> tuple[Any, Any] | None:
    if type(value) is not str or not _DAY_FORM(value):
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        return None
    return (day, value) if EARLIEST.date() <= day <= LATEST_DAY else None


_DAY_FORM = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII).fullmatch
_PRICE_PATTERN = r"[0-9]{1,12}(\.[0-9]{1,4})?"


#: A calendar day, ``YYYY-MM-DD``.
DAY: Final = Kind(
    annotation=Annotated[dt.date, BeforeValidator(must_be_string), AfterValidator(_day_in_range)],
    cql="date",
    load=dt.date.fromisoformat,  # TypeError for a non-string
    dump=_dump_day,
    json_type=str,
    fast=_fast_day,
)
#: A non-negative decimal string with up to 4 decimals, stored exactly (``decimal`` keeps the scale).
PRICE: Final = Kind(
    annotation=Annotated[
        StrictStr,
        Field(pattern=f"^{_PRICE_PATTERN}$", examples=["149.90"]),
        AfterValidator(_non_negative_decimal),
    ],
    cql="decimal",
    load=_load_decimal,
    dump=str,
    json_type=str,
    from_sdk=_price_from_number,
    # Queued as it is read back: the decimal's own text ("0149.90" -> "149.90"); never negative by the pattern.
    fast=_fast_matching(_PRICE_PATTERN, lambda value: str(Decimal(value))),
)
#: An ISO 4217 code.
CURRENCY: Final = Kind(
    annotation=Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$", examples=["EUR"])],
    cql="text",
    load=_load_str,
    dump=str,
    json_type=str,
    fast=_fast_matching(r"[A-Z]{3}"),
)


@dataclass(frozen=True)
class EventField:
    """One field of one event type, and its column (same name) in both event tables."""

    name: str
    kind: Kind
    description: str = ""
    #: An optional field may be absent or null in the request; it is queued as null, and left *unset* in
    #: Cassandra (never written as a null, which would be a tombstone).
    required: bool = True
    #: Where an SDK message (Segment's, PostHog's) holds this field, as a dotted path; None means
    #: ``properties.<name>``.
    source: str | None = None

    @property
    def sdk_source(self) -> str:
        return self.source or f"properties.{self.name}"


@dataclass(frozen=True)
class EventType:
    """One type of event: the ``type`` value, the model's name, its own fields, how ``/stats`` counts it."""

    name: str
    #: The pydantic model's name, which is also its schema's name in the OpenAPI document.
    model_name: str
    doc: str
    #: The key of this type's count in ``/v1/listings/{id}/stats`` (per day and in total).
    stats_key: str
    fields: tuple[EventField, ...] = ()
    #: A rule across fields, run on an event whose fields are each valid: the error message, or None.
    check: Callable[[Any], str | None] | None = None
    #: The event names analytics SDKs send this type as (Segment's ``track`` event or ``page`` name,
    #: PostHog's ``event``); SLUICE_SDK_EVENTS adds more.
    sent_as: tuple[str, ...] = ()

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


def _stay_is_forward(event: Any) -> str | None:
    return "check_out must be after check_in" if event.check_out <= event.check_in else None


VIEW: Final = EventType(
    name="view", model_name="ViewEvent", doc="A user viewed a listing.", stats_key="views", sent_as=("Listing Viewed",)
)

BOOKING: Final = EventType(
    name="booking",
    model_name="BookingEvent",
    doc="A user booked a listing.",
    stats_key="bookings",
    fields=(
        EventField("check_in", DAY),
        EventField("check_out", DAY),
        EventField("guests", integer(ge=1, le=50)),
        EventField("total_price", PRICE, "Non-negative decimal string, up to 4 decimal places."),
        EventField("currency", CURRENCY, "ISO 4217 code, three capital letters."),
    ),
    check=_stay_is_forward,
    sent_as=("Booking Completed",),
)

SEARCH: Final = EventType(
    name="search",
    model_name="SearchEvent",
    doc="A user's search showed a listing among its results.",
    stats_key="searches",
    fields=(
        EventField("query", text(min_length=1, max_length=256), "The search text as the user typed it."),
        EventField("result_count", integer(ge=0, le=MAX_INT), "How many listings the search found."),
    ),
    # Segment's e-commerce spec names a search "Products Searched" (with a ``query`` property).
    sent_as=("Listings Searched", "Products Searched"),
)

#: Every event type, in the order of their columns in both tables (and of their schemas and counters).
REGISTRY: Final[tuple[EventType, ...]] = (VIEW, BOOKING, SEARCH)

#: The fields every event has; a type may not declare them again.
COMMON_FIELDS: Final = ("event_id", "type", "listing_id", "user_id", "occurred_at")
#: Where the fields every event has come from in each SDK wire format (dotted paths into one message).
#: ``segment`` is also RudderStack's format; ``occurred_at`` falls back to Segment's clock-skew rule
#: (sluice/sdkmap.py) when a message has no ``timestamp``.
SDK_COMMON_SOURCES: Final[dict[str, dict[str, str]]] = {
    "segment": {
        "event_id": "messageId",
        "user_id": "userId",
        "listing_id": "properties.listing_id",
        "occurred_at": "timestamp",
    },
    "posthog": {
        "event_id": "uuid",
        "user_id": "distinct_id",
        "listing_id": "properties.listing_id",
        "occurred_at": "timestamp",
    },
}
#: Columns of the tables that are not event fields.
RESERVED_COLUMNS: Final = ("day", "accepted_at")


def _check_registry(types: tuple[EventType, ...]) -> dict[str, EventType]:
    """The registry by name, after checking what the derived code relies on; raises at import otherwise."""
    by_name: dict[str, EventType] = {}
    owner: dict[str, str] = {}
    stats_keys: set[str] = set()
    sent_as: dict[str, str] = {}
    for kind in types:
        if kind.name in by_name:
            raise ValueError(f"event type {kind.name!r} is declared twice")
        for sdk_name in kind.sent_as:
            # One name, one type: an SDK event must never be stored as whichever type happens to come first.
            if sdk_name in sent_as:
                raise ValueError(f"SDK event name {sdk_name!r} is sent as both {sent_as[sdk_name]!r} and {kind.name!r}")
            sent_as[sdk_name] = kind.name
        if kind.stats_key in stats_keys or kind.stats_key in ("day", "listing_id", "days"):
            raise ValueError(f"event type {kind.name!r}: stats key {kind.stats_key!r} is taken")
        by_name[kind.name] = kind
        stats_keys.add(kind.stats_key)
        for f in kind.fields:
            if f.name in COMMON_FIELDS or f.name in RESERVED_COLUMNS:
                raise ValueError(f"event type {kind.name!r}: {f.name!r} is a common field or a reserved column")
            # One column per field name: the worker binds each type's columns as one contiguous run, and a
            # column shared by two types could not say whose cell it holds. A field every type needs belongs
            # to COMMON_FIELDS instead.
            if f.name in owner:
                raise ValueError(f"field {f.name!r} is declared by both {owner[f.name]!r} and {kind.name!r}")
            owner[f.name] = kind.name
    return by_name


BY_NAME: Final[dict[str, EventType]] = _check_registry(REGISTRY)
#: The ``type`` values, in registry order.
TYPE_NAMES: Final[tuple[str, ...]] = tuple(BY_NAME)
#: Every type's own fields, in column order (registry order, then declaration order).
TYPE_FIELDS: Final[tuple[EventField, ...]] = tuple(f for kind in REGISTRY for f in kind.fields)


@dataclass(frozen=True)
class Layout:
    """Where one type's values go among :data:`TYPE_FIELDS`: its own fields are one contiguous run, the other
    types' columns before and after it stay unset."""

    kind: EventType
    before: int
    after: int
    keys: frozenset[str] = field(default=frozenset())


def layouts() -> dict[str, Layout]:
    out: dict[str, Layout] = {}
    start = 0
    for kind in REGISTRY:
        end = start + len(kind.fields)
        keys = frozenset(COMMON_FIELDS) | set(kind.field_names)
        out[kind.name] = Layout(kind, before=start, after=len(TYPE_FIELDS) - end, keys=keys)
        start = end
    return out

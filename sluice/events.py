"""The event model (contract v1), shared by the API that validates events and the worker that stores them.

An event arrives as parsed JSON (``dict``) and is validated one at a time, so that in a batch each event is
judged on its own. Types are strict where JSON could smuggle a wrong type past a lax parser: ``"5"`` and
``true`` are not integers, a number is not a timestamp. Unknown fields are refused, which also refuses
booking fields on a view.

The models are built from the declarations in sluice/eventtypes.py (one per type); only the fields every
event has are written out here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Union
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
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    model_validator,
)

from sluice.eventtypes import (
    COMMON_FIELDS,
    EARLIEST,
    MAX_BIGINT,
    REGISTRY,
    TYPE_NAMES,
    EventField,
    EventType,
    must_be_string,
)


def _in_time_range(value: dt.datetime, info: ValidationInfo) -> dt.datetime:
    # In UTC from here on (the instant is the same; the stored form is UTC anyway): comparing and formatting
    # datetimes that share dt.UTC skips a call to pydantic's offset object per operation, which took a fifth
    # of the API's CPU on batches (py-spy, 2026-11-30).
    value = value.astimezone(dt.UTC)
    if value < EARLIEST:
        raise ValueError("must not be before 2000-01-01T00:00:00Z")
    # The API passes the latest instant its clock allows, and the retention's earliest; the worker, judging an
    # event already accepted, passes neither.
    context = info.context
    if context is not None:
        if value > context["latest"]:
            raise ValueError(f"must not be more than {context['max_future_s']} s in the future")
        days = context["retention_days"]
        if days and value <= context["expired"]:
            # An event is kept SLUICE_RETENTION_DAYS after it occurred (docs/retention.md): one older than that
            # would expire the moment it is stored, so the client hears it now rather than finding it gone.
            raise ValueError(
                f"must be within the retention of {days} day{'s' if days != 1 else ''} (SLUICE_RETENTION_DAYS): "
                "older events are not stored"
            )
    return value


#: RFC 3339's date-time (section 5.6), with its offset: "T" and "Z" in either case, seconds required, any
#: fraction. pydantic alone would also take a Unix time ("1732527000"), a space for the "T", no seconds or an
#: offset without its colon; the contract is RFC 3339, so those are refused before pydantic parses.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: Any) -> Any:
    must_be_string(value)
    if not _RFC3339.fullmatch(value):
        if value.strip().lstrip("+-").replace(".", "", 1).isdigit():
            raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-11-25T09:30:00Z, not a Unix time")
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-11-25T09:30:00Z")
    return value


Identifier = Annotated[StrictInt, Field(gt=0, le=MAX_BIGINT)]
EventId = Annotated[UUID, BeforeValidator(must_be_string)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_in_time_range)]


class EventBase(BaseModel):
    """What every event has; each type's model (built from sluice/eventtypes.py) adds ``type`` and its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: EventId = Field(description="Chosen by the client; the idempotency key.")
    listing_id: Identifier
    user_id: Identifier
    occurred_at: Timestamp = Field(description="RFC 3339 with an offset, e.g. 2026-11-25T09:30:00Z.")
    if TYPE_CHECKING:  # each type's model declares it as a Literal of its name
        type: str


def _cross_check(rule: Callable[[Any], str | None]) -> Any:
    def run(self: EventBase) -> EventBase:
        problem = rule(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    return model_validator(mode="after")(run)


def _model(kind: EventType) -> type[EventBase]:
    """The pydantic model of one declared type: strict fields, unknown fields refused, its cross-field rule."""
    fields: dict[str, Any] = {"type": (Literal[kind.name], ...)}
    for f in kind.fields:
        if f.required:
            fields[f.name] = (f.kind.annotation, Field(description=f.description or None))
        else:
            fields[f.name] = (f.kind.annotation | None, Field(None, description=f.description or None))
    validators = {"_check": _cross_check(kind.check)} if kind.check else None
    model = create_model(
        kind.model_name,
        __base__=EventBase,
        __doc__=kind.doc,
        __validators__=validators,
        __module__=__name__,
        **fields,
    )
    _TYPE_FIELDS[model] = kind.fields
    return model


#: Each model's declared fields (queued_form puts them in their stored form).
_TYPE_FIELDS: dict[type[EventBase], tuple[EventField, ...]] = {}


#: Each type's model, by type name.
MODELS: dict[str, type[EventBase]] = {kind.name: _model(kind) for kind in REGISTRY}
ViewEvent = MODELS["view"]
BookingEvent = MODELS["booking"]
SearchEvent = MODELS["search"]

#: Any event: a union of the models, discriminated by ``type`` (its OpenAPI schema is "Event"). Built at
#: run time from the registry, so type checkers see the base every model shares.
if TYPE_CHECKING:
    Event = EventBase
else:
    Event = Annotated[Union[tuple(MODELS.values())], Field(discriminator="type")]  # noqa: UP007
EVENT_ADAPTER: TypeAdapter[EventBase] = TypeAdapter(Event)

EVENT_TYPES = TYPE_NAMES


class FieldError(BaseModel):
    """One problem with one field: ``loc`` is the JSON path from the request body's root."""

    loc: list[str | int]
    msg: str
    type: str


def validate_event(
    raw: Any,
    loc_prefix: tuple[str | int, ...] = (),
    *,
    max_future_s: int | None = None,
    retention_days: int = 0,
    context: dict[str, Any] | None = None,
) -> EventBase | list[FieldError]:
    """Validate one decoded JSON event: the event, or the list of what is wrong with it.

    ``max_future_s`` bounds how far ``occurred_at`` may lie ahead of our clock, ``retention_days`` (0: keep
    forever) how far behind it (the API sets both); ``context``, a :func:`time_range` made once, instead.
    """
    if context is None:
        context = time_range(max_future_s, retention_days)
    try:
        return EVENT_ADAPTER.validate_python(raw, context=context)
    except ValidationError as exc:
        return [_field_error(err, loc_prefix) for err in exc.errors(include_url=False, include_input=False)]


def time_range(max_future_s: int | None, retention_days: int) -> dict[str, Any] | None:
    """What the time-range check needs from the API: the latest instant its clock allows, the retention's
    earliest (None: the worker, judging an event already accepted). A batch's events share one.

    The same one for :data:`_RANGE_REUSE_S` (read-only): its bounds are then that much behind the clock, against
    an allowance of minutes (``SLUICE_MAX_CLOCK_SKEW_S``) and a retention of days (a write's TTL is at least
    1 s: sluice.cassandra.ttl_s). Making one per single event was 3 % of the API's CPU per request."""
    if max_future_s is None:
        return None
    key = (max_future_s, retention_days)
    clock = time.monotonic()
    kept = _RANGES.get(key)
    if kept is not None and clock < kept[0]:
        return kept[1]
    now = dt.datetime.now(dt.UTC)
    made = {
        "latest": now + dt.timedelta(seconds=max_future_s),
        "max_future_s": max_future_s,
        "retention_days": retention_days,
        "expired": now - dt.timedelta(days=retention_days or 0),
    }
    _RANGES[key] = (clock + _RANGE_REUSE_S, made)
    return made


#: How long :func:`time_range` gives out the same bounds (seconds).
_RANGE_REUSE_S: Final = 0.05
_RANGES: dict[tuple[int, int], tuple[float, dict[str, Any]]] = {}


class _Checked:
    """What a type's cross-field rule reads on the fast path: the values the model would hold, as attributes."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


@dataclass(frozen=True, slots=True)
class _FastType:
    name: str
    keys: frozenset[str]
    required: frozenset[str]
    fields: tuple[tuple[str, Callable[[Any], tuple[Any, Any] | None], bool], ...]
    check: Callable[[Any], str | None] | None


_FAST: Final = {
    kind.name: _FastType(
        kind.name,
        frozenset(COMMON_FIELDS) | set(kind.field_names),
        frozenset(COMMON_FIELDS) | {f.name for f in kind.fields if f.required},
        tuple((f.name, f.kind.fast, f.required) for f in kind.fields),
        kind.check,
    )
    for kind in REGISTRY
}
#: The canonical text of a UUID and of an RFC 3339 instant as clients send them (the fast path takes no other).
_UUID_FORM: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}").fullmatch
_INSTANT_FORM: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})", re.ASCII
).fullmatch


def _fast_queued(raw: Any, context: dict[str, Any] | None) -> dict[str, Any] | None:
    """The queued form of an event in the plain form clients send, without the model: None for anything else
    (the model then decides, and says what is wrong). Never accepts what the model refuses, never queues a
    value in another form than :func:`queued_form` (tests/test_fast_path.py runs both on generated events)."""
    if type(raw) is not dict:
        return None
    kind = raw.get("type")
    shape = _FAST.get(kind) if type(kind) is str else None
    if shape is None:
        return None
    present = raw.keys()
    if not present <= shape.keys or not shape.required <= present:
        return None
    event_id, listing_id, user_id, occurred = raw["event_id"], raw["listing_id"], raw["user_id"], raw["occurred_at"]
    if (type(listing_id) is not int or type(user_id) is not int or not 0 < listing_id <= MAX_BIGINT
            or not 0 < user_id <= MAX_BIGINT or type(event_id) is not str or not _UUID_FORM(event_id)
            or type(occurred) is not str or not _INSTANT_FORM(occurred)):  # fmt: skip
        return None
    try:
        instant = dt.datetime.fromisoformat(occurred).astimezone(dt.UTC)
    except ValueError:
        return None
    if instant < EARLIEST or (context is not None and (
            instant > context["latest"] or (context["retention_days"] and instant <= context["expired"]))):  # fmt: skip
        return None
    # An instant already in the queued form (UTC, milliseconds: 2026-11-25T08:30:00.250Z) is queued as sent.
    text = occurred if len(occurred) == 24 and occurred[19] == "." and occurred[23] == "Z" else iso_utc_ms(instant)
    out: dict[str, Any] = {"event_id": event_id.lower(), "type": kind, "listing_id": listing_id, "user_id": user_id,
                           "occurred_at": text}  # fmt: skip
    held: dict[str, Any] = {}
    for name, fast, required in shape.fields:
        value = raw.get(name)
        if value is None:
            if required:
                return None
            out[name] = held[name] = None
            continue
        converted = fast(value)
        if converted is None:
            return None
        held[name], out[name] = converted
    if shape.check is not None and shape.check(_Checked(held)) is not None:
        return None
    return out


def validate_queued(
    raw: Any,
    loc_prefix: tuple[str | int, ...] = (),
    *,
    max_future_s: int | None = None,
    retention_days: int = 0,
    context: dict[str, Any] | None = None,
) -> dict[str, Any] | list[FieldError]:
    """:func:`validate_event`, then :func:`queued_form`: the event in its queued form, or what is wrong with it.

    Events in the plain form clients send skip the model (one pass over the dict, no model instance, no dump):
    the API's hot path. Anything else goes through the model, which gives the error messages. ``context``: a
    :func:`time_range` made once for many events, instead of one from ``max_future_s`` and ``retention_days``."""
    if context is None:
        context = time_range(max_future_s, retention_days)
    fast = _fast_queued(raw, context)
    if fast is not None:
        return fast
    checked = validate_event(raw, loc_prefix, context=context)
    return checked if isinstance(checked, list) else queued_form(checked)


def _field_error(err: Any, loc_prefix: tuple[str | int, ...]) -> FieldError:
    loc = list(err["loc"])
    # A discriminated union puts the chosen tag ("view", "booking", ...) first in the path; it is not a field.
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


def queued_form(event: EventBase) -> dict[str, Any]:
    """The event as it travels on the queue and is stored: plain JSON in the form Cassandra gives back, so two
    posts that store the same row have the same queued form (and fingerprint), whatever their spelling.

    ``occurred_at`` in UTC at millisecond precision (what Cassandra keeps); every declared field as its kind
    reads it back after storing it (``dump(load(value))``): a price ``"0149.90"`` is stored as the decimal
    149.90 and read back as ``"149.90"``, so it is queued as ``"149.90"``, and posting ``"0149.90"`` again, or
    ``"149.90"``, is a duplicate, not a conflict. Input is normalised, not refused: the value is the same
    number. (A price's scale is part of its value, as in Cassandra: ``"149.9"`` is another price.)"""
    out = event.model_dump(mode="json")
    out["occurred_at"] = iso_utc_ms(event.occurred_at)
    for f in _TYPE_FIELDS.get(type(event), ()):
        value = out[f.name]
        if value is not None:
            out[f.name] = f.kind.dump(f.kind.load(value))
    return out


def iso_utc_ms(value: dt.datetime) -> str:
    """``2026-11-25T08:30:00.250Z``: UTC, milliseconds (an aware datetime, or a naive one meaning UTC)."""
    if value.tzinfo is not dt.UTC:  # validated events are in UTC already (see _in_time_range)
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    # %-formatting, not isoformat(timespec=...): a third less time, and this runs once per event the API takes.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031
        value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond // 1000
    )  # fmt: skip


def fingerprint(queued: dict[str, Any]) -> str:
    """16 hex digits that differ when two versions of one ``event_id`` differ in anything that is stored."""
    return hashlib.blake2b(orjson.dumps(queued, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()

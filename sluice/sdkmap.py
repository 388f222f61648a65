"""Analytics SDKs' messages -> Sluice events, driven by the registry's declarations (sluice/eventtypes.py).

Two wire formats:

- ``segment``: Segment's SDKs and RudderStack's (same format). A message has ``type`` (``track``, ``page``,
  ``screen``, ``identify``, ``group``, ``alias``), ``event`` (track) or ``name`` (page, screen), ``userId``
  and/or ``anonymousId``, ``properties``, ``messageId``, ``timestamp`` (or ``originalTimestamp``).
- ``posthog``: ``{event, distinct_id, properties, timestamp, uuid}``.

A message becomes an event when its name is one a type is sent as (``EventType.sent_as`` plus
``SLUICE_SDK_EVENTS``); each field is read from where the type declares it (``EventField.sdk_source``, the
common ones from ``SDK_COMMON_SOURCES``), and the event is then validated by the same model as a native one,
so an SDK cannot store anything the native routes would refuse. ``identify``, ``group`` and ``alias`` (and
PostHog's ``$identify``, ``$create_alias``, ``$groupidentify``, ``$set``) are about people, not listings:
they are *counted*, not stored. Everything else is *rejected* with the reason and the path of what is wrong;
the route keeps it as a dead letter (sluice/deadletters.py), and ``sluice dlq replay`` sends it through here
again once a mapping exists.

Translation is a pure function of the message, the key, the times of the request and the mapping, so the
same message posted twice (an SDK's retry) is the same event, and a replay finds the event the first post
would have made.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, Literal

import orjson

from sluice.events import FieldError, iso_utc_ms, validate_queued
from sluice.eventtypes import BY_NAME, REGISTRY, SDK_COMMON_SOURCES, EventType
from sluice.settings import Settings, get_settings

Format = Literal["segment", "posthog"]
Status = Literal["accepted", "counted", "rejected"]

#: Segment calls that carry an event name, and the message field that holds it.
NAMED_CALLS: Final = {"track": "event", "page": "name", "screen": "name"}
#: Segment calls about people and accounts: accepted and counted, not stored.
COUNTED_CALLS: Final = frozenset({"identify", "group", "alias"})
#: PostHog's events for the same: counted under the Segment call they stand for.
POSTHOG_COUNTED: Final = {"$identify": "identify", "$set": "identify", "$groupidentify": "group",
                          "$create_alias": "alias"}  # fmt: skip

#: Derives an event id from a ``messageId`` that is no UUID (with the key: two keys' "1" are two events).
MESSAGE_ID_NAMESPACE: Final = uuid.UUID("5d1c3e0a-9b7f-5c1e-8a5e-51c1ce5d4b00")

_NOT_CONTENT: Final = frozenset({"sentAt", "sent_at", "receivedAt", "writeKey", "api_key"})
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_MISSING: Final = object()


@dataclass(frozen=True)
class Route:
    """What one event name becomes: its type, and where each of its fields is read from."""

    kind: EventType
    #: field -> dotted path in the message: the type's own fields (and ``listing_id`` if not the common one).
    sources: Mapping[str, str]


class SdkMapping:
    """Event name -> :class:`Route`: the registry's ``sent_as`` names, then the operator's (which win)."""

    def __init__(self, extra: Mapping[str, str | Mapping[str, Any]] | None = None) -> None:
        self.routes: dict[str, Route] = {}
        for kind in REGISTRY:
            for name in kind.sent_as:
                self.routes[name] = _route(kind, {})
        for name, spec in (extra or {}).items():
            self.routes[name] = _parse_extra(name, spec)

    @classmethod
    def from_settings(cls, settings: Settings) -> SdkMapping:
        return cls(settings.sdk_events)

    def route(self, name: str) -> Route | None:
        return self.routes.get(name)


def _route(kind: EventType, overrides: Mapping[str, str]) -> Route:
    # ``listing_id`` comes from the format's common source unless the operator names another.
    return Route(kind, {f.name: f.sdk_source for f in kind.fields} | dict(overrides))


def _parse_extra(name: str, spec: str | Mapping[str, Any]) -> Route:
    """One entry of SLUICE_SDK_EVENTS; a ValueError names what is wrong (the API refuses to start)."""
    where = f"SLUICE_SDK_EVENTS[{name!r}]"
    if isinstance(spec, str):
        spec = {"type": spec}
    type_name = spec.get("type")
    kind = BY_NAME.get(type_name) if isinstance(type_name, str) else None
    if kind is None:
        raise ValueError(f"{where}: type must be one of {sorted(BY_NAME)}, not {type_name!r}")
    unknown = set(spec) - {"type", "fields"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (only 'type' and 'fields')")
    fields = spec.get("fields", {})
    if not isinstance(fields, Mapping):
        raise ValueError(f"{where}: fields must be an object of field -> dotted path")
    allowed = {"listing_id", *kind.field_names}
    for field_name, path in fields.items():
        if field_name not in allowed:
            raise ValueError(f"{where}: {field_name!r} is not a field of {kind.name!r} ({sorted(allowed)})")
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise ValueError(f"{where}: the source of {field_name!r} must be a dotted path, not {path!r}")
    return _route(kind, fields)


@lru_cache(maxsize=1)
def current() -> SdkMapping:
    """This process's mapping, from its settings (``sluice dlq replay`` reads the same SLUICE_SDK_EVENTS)."""
    return SdkMapping.from_settings(get_settings())


@dataclass(frozen=True)
class Request:
    """What a message's translation depends on besides the message: its format, the key, the request's times."""

    format: Format
    key_id: str
    received_at: dt.datetime
    #: The batch's ``sentAt`` / ``sent_at`` as sent (a message's own ``sentAt`` wins).
    sent_at: Any = None

    def as_json(self) -> dict[str, Any]:
        return {"format": self.format, "key_id": self.key_id, "received_at": iso_utc_ms(self.received_at),
                "sent_at": self.sent_at if isinstance(self.sent_at, str) else None}  # fmt: skip

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Request:
        received = dt.datetime.fromisoformat(str(value["received_at"]))
        return cls(value["format"], str(value["key_id"]), received, value.get("sent_at"))


@dataclass
class Outcome:
    """One message's verdict: an event to queue (``accepted``), ``counted``, or ``rejected`` with errors."""

    status: Status
    #: The SDK call: ``track``, ``page``, ``identify``, ... (PostHog's messages: ``capture``, or the call a
    #: ``$identify`` stands for).
    call: str
    #: The event name as sent (the metric label of a rejection), or the call for unnamed ones.
    name: str
    event_id: str | None = None
    message_id: str | None = None
    #: The type the name maps to (also for a rejection of a mapped name: a bad field).
    kind: str | None = None
    #: The event in its queued form (sluice.events.queued_form).
    event: dict[str, Any] | None = None
    errors: list[FieldError] = field(default_factory=list)
    #: A short reason for metrics: unknown_name, anonymous, invalid_user_id, invalid_field, ...
    reason: str = ""


def translate(
    msg: Any,
    request: Request,
    mapping: SdkMapping,
    loc: tuple[str | int, ...] = (),
    *,
    max_future_s: int | None = None,
    retention_days: int = 0,
) -> Outcome:
    """The verdict on one message (``loc``: its path from the request body's root, for the errors)."""
    event_id = derive_event_id(msg, request)
    if not isinstance(msg, dict):
        return _reject("unknown", "unknown", [], loc, "must be an object", "not_an_object", event_id)
    common = SDK_COMMON_SOURCES[request.format]
    message_id = _echo(_get(msg, common["event_id"]))
    if request.format == "segment":
        call = str(msg.get("type", "")).lower()
        if call in COUNTED_CALLS:
            return Outcome("counted", call, call, event_id, message_id)
        if call not in NAMED_CALLS:
            return _reject(call or "unknown", "unknown", ["type"], loc,
                           f"unknown message type {_short(msg.get('type'))}: one of track, page, screen, identify, "
                           "group, alias", "unknown_type", event_id, message_id)  # fmt: skip
        name_field = NAMED_CALLS[call]
    else:
        call, name_field = "capture", "event"
        counted = POSTHOG_COUNTED.get(msg.get("event"))  # type: ignore[arg-type]
        if counted is not None:
            return Outcome("counted", counted, str(msg["event"]), event_id, message_id)
    name = msg.get(name_field)
    if not isinstance(name, str) or not name:
        return _reject(call, call, [name_field], loc, f"a {call} needs a name ({name_field})", "no_name",
                       event_id, message_id)  # fmt: skip
    route = mapping.route(name)
    if route is None:
        return _reject(call, name, [name_field], loc,
                       f"no event type is sent as {_short(name)}: add it to SLUICE_SDK_EVENTS, then replay the dead "
                       "letter", "unknown_name", event_id, message_id)  # fmt: skip

    # The user: a number, as the native events have it (Segment's SDKs send ids as strings).
    user_path = common["user_id"]
    raw_user = _get(msg, user_path)
    user = _identifier(raw_user)
    if user is None:
        if raw_user not in (_MISSING, None):
            why, reason = f"{user_path} must be a positive integer (a number or a string of digits)", "invalid_user_id"
        elif request.format == "segment" and _get(msg, "anonymousId") not in (_MISSING, None):
            why, reason = "only an anonymousId: Sluice stores the events of known users (a numeric userId)", "anonymous"
        else:
            why, reason = f"{user_path} is required", "no_user_id"
        rejection = _reject(call, name, user_path.split("."), loc, why, reason, event_id, message_id)
        rejection.kind = route.kind.name
        return rejection

    event: dict[str, Any] = {"event_id": event_id, "type": route.kind.name, "user_id": user}
    #: field -> the path its value came from, to name the SDK's field in an error.
    paths: dict[str, str] = {"event_id": common["event_id"], "user_id": user_path, "type": name_field}
    occurred_at, paths["occurred_at"] = occurred_at_of(msg, request)
    event["occurred_at"] = occurred_at
    kinds = {f.name: f for f in route.kind.fields}
    for field_name, path in ({"listing_id": common["listing_id"]} | dict(route.sources)).items():
        value = _get(msg, path)
        paths[field_name] = path
        if value is _MISSING or value is None:
            continue  # a required field is then "missing", at its path; an optional one stays unset
        if field_name == "listing_id":
            number = _identifier(value)
            event[field_name] = value if number is None else number
        else:
            convert = kinds[field_name].kind.from_sdk
            event[field_name] = convert(value) if convert else value
    validated = validate_queued(event, max_future_s=max_future_s, retention_days=retention_days)
    if isinstance(validated, list):
        errors = [_at_source(error, paths, loc) for error in validated]
        return Outcome("rejected", call, name, event_id, message_id, route.kind.name, errors=errors,
                       reason="invalid_field")  # fmt: skip
    return Outcome("accepted", call, name, event_id, message_id, route.kind.name, event=validated)


def derive_event_id(msg: Any, request: Request) -> str:
    """The event id of a message: its ``messageId`` (``uuid``) when that is a UUID; otherwise a UUID derived
    from it and the key (uuid5), so a retry of the same message is the same event; a message without one
    gets a UUID derived from its whole content and the key."""
    source = SDK_COMMON_SOURCES[request.format]["event_id"] if isinstance(msg, dict) else ""
    value = _get(msg, source) if source else _MISSING
    if isinstance(value, str) and len(value) == 36:
        if _CANONICAL_UUID.fullmatch(value):  # what the SDKs send: no need for a UUID object
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
        basis = f"{request.key_id}\0message\0{value}"
    else:
        # The request's own parts (a single message's sentAt) change between an SDK's attempts: not content.
        content = {k: v for k, v in msg.items() if k not in _NOT_CONTENT} if isinstance(msg, dict) else msg
        basis = f"{request.key_id}\0content\0" + orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, basis))


def occurred_at_of(msg: dict[str, Any], request: Request) -> tuple[Any, str]:
    """``occurred_at`` and the field it came from.

    ``timestamp`` as sent. Without one, Segment's clock-skew rule: ``originalTimestamp`` is the device's clock
    when the event happened and ``sentAt`` the same clock when the batch left, so ``receivedAt - sentAt`` is
    how far that clock is behind ours (plus the transit); it is added to ``originalTimestamp``. The
    correction is rounded to whole seconds so that a retry of the same batch, sent later with a new
    ``sentAt``, is still the same event (what differs between attempts is the transit, milliseconds). With
    neither: when the request arrived (such an event's retry cannot be told from a new one: send a timestamp).
    """
    timestamp = msg.get("timestamp")
    if timestamp is not None:
        return timestamp, "timestamp"
    original = msg.get("originalTimestamp")
    if original is None:
        return iso_utc_ms(request.received_at), "timestamp"
    sent_at = msg.get("sentAt", request.sent_at)
    device_time, device_sent = _instant(original), _instant(sent_at)
    if device_time is None:
        return original, "originalTimestamp"  # the model says what is wrong with it, at that path
    if device_sent is None:
        return iso_utc_ms(device_time), "originalTimestamp"
    skew_s = round((request.received_at - device_sent).total_seconds())
    return iso_utc_ms(device_time + dt.timedelta(seconds=skew_s)), "originalTimestamp"


def _instant(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _identifier(value: Any) -> int | None:
    """An id as a number: a JSON integer, or a string of digits (SDKs send ids as strings)."""
    if type(value) is int:
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    return None


def _get(msg: Any, path: str) -> Any:
    value = msg
    for part in _parts(path):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


@lru_cache(maxsize=1024)
def _parts(path: str) -> tuple[str, ...]:
    # A handful of distinct paths, read for every message: split once (bounded: the mapping's paths).
    return tuple(path.split("."))


def _at_source(error: FieldError, paths: Mapping[str, str], loc: tuple[str | int, ...]) -> FieldError:
    """A model error on a Sluice field, at the SDK field it was read from (``guests`` -> ``properties.guests``)."""
    where: list[str | int] = list(error.loc)
    if where and isinstance(where[0], str) and where[0] in paths:
        where = [*paths[where[0]].split("."), *where[1:]]
    return FieldError(loc=[*loc, *where], msg=error.msg, type=error.type)


def _reject(
    call: str,
    name: str,
    where: Sequence[str | int],
    loc: tuple[str | int, ...],
    msg: str,
    reason: str,
    event_id: str | None,
    message_id: str | None = None,
) -> Outcome:
    error = FieldError(loc=[*loc, *where], msg=msg, type=reason)
    return Outcome("rejected", call, name, event_id, message_id, errors=[error], reason=reason)


def _echo(value: Any) -> str | None:
    # Echo only what could be an id: a hostile client must not get a megabyte string sent back.
    if isinstance(value, str) and len(value) <= 100 and value.isprintable():
        return value
    return None


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return repr(text[:100] + ("..." if len(text) > 100 else ""))

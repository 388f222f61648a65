"""Reads of one listing: its events in time order (paged across day partitions) and per-day statistics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

import orjson
from fastapi import APIRouter, Path, Query, Request
from pydantic import AfterValidator, AwareDatetime, BaseModel, create_model

from api.deps import AUTHORIZED, RATE_LIMITED, ResourcesDep, StoreDep, charge
from api.errors import ApiError, store_read_failed
from api.responses import JSONResponse
from api.routes.events import AUTH_ERRORS, StoredEventOut, _errors
from sluice.cassandra import Store
from sluice.eventtypes import EARLIEST, LATEST_DAY, REGISTRY, TYPE_NAMES

# The rate limit: a page of events costs one unit (it reads at most SCAN_BUDGET rows); /stats charges its own.
router = APIRouter(prefix="/v1/listings", tags=["listings"], dependencies=[AUTHORIZED])

#: The widest time range one request may cover: it bounds the day partitions one page may visit.
MAX_RANGE = dt.timedelta(days=92)
DEFAULT_RANGE = dt.timedelta(days=7)
#: Sorts before every real (version 1..5) UUID, so (t, ZERO) is the first position at instant t.
ZERO = UUID(int=0)
ListingId = Annotated[int, Path(gt=0, le=2**63 - 1)]
#: Rows one page request may read from Cassandra: with a type filter, rows of the other type are read and
#: skipped, and without a bound a rare type over 92 days would read every row of the listing in one request.
SCAN_BUDGET = 2000
#: Where a page starts: the day partition, the (occurred_at, event_id) position, and whether it is included.
_Cursor = tuple[dt.date, tuple[dt.datetime, UUID], bool]
#: /stats: rows its counts scan per rate-limit unit (on top of one unit per partition and type it counts).
ROWS_PER_UNIT = 100

#: The instants and days a read may name: where events can be (none before 2000, none after 2199). Checked
#: before any arithmetic: a date near 0001-01-01 or 9999-12-31 would overflow it (a 500 or 503, not a 422).
READ_LATEST = dt.datetime.combine(LATEST_DAY + dt.timedelta(days=1), dt.time(), dt.UTC)


def _instant_in_range(value: dt.datetime) -> dt.datetime:
    try:
        value = value.astimezone(dt.UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00:00-05:00 is past datetime's last instant in UTC
        value = dt.datetime.max.replace(tzinfo=dt.UTC)
    if not EARLIEST <= value <= READ_LATEST:
        raise ValueError("must be between 2000-01-01T00:00:00Z and 2200-01-01T00:00:00Z")
    return value


def _day_in_range(value: dt.date) -> dt.date:
    if not EARLIEST.date() <= value <= LATEST_DAY:
        raise ValueError("must be between 2000-01-01 and 2199-12-31")
    return value


ReadInstant = Annotated[AwareDatetime, AfterValidator(_instant_in_range)]
ReadDay = Annotated[dt.date, AfterValidator(_day_in_range)]


READ_ERRORS = {**AUTH_ERRORS, **_errors(422, "Invalid parameters."), **_errors(503, "Cassandra is unreachable.")}
PAGE_ERRORS = {**READ_ERRORS, **_errors(400, "The page token was not made by this API for this query.")}


class EventsPage(BaseModel):
    events: list[StoredEventOut]
    next_page_token: str | None


#: The counters of /stats: one per declared type, under its ``stats_key`` ("views", "bookings", ...).
STATS_KEYS = tuple(kind.stats_key for kind in REGISTRY)
if TYPE_CHECKING:
    DayStats = BaseModel
    Stats = BaseModel
else:
    DayStats = create_model("DayStats", day=(dt.date, ...), **dict.fromkeys(STATS_KEYS, (int, ...)))
    Stats = create_model(
        "Stats", listing_id=(int, ...), days=(list[DayStats], ...), **dict.fromkeys(STATS_KEYS, (int, ...))
    )


def _range(start: dt.datetime | None, end: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    """The range a first page covers; both ends already in range and in UTC (:data:`ReadInstant`)."""
    given_start = start is not None
    end = end or dt.datetime.now(dt.UTC)
    start = start or max(EARLIEST, end - DEFAULT_RANGE)
    if start >= end:
        where = "from" if given_start else "to"
        raise ApiError(422, "invalid_range", "'from' must be before 'to'", [{"loc": ["query", where],
                       "msg": "must be after 'from'" if where == "to" else "must be before 'to'",
                       "type": "value_error"}])  # fmt: skip
    if end - start > MAX_RANGE:
        raise ApiError(422, "invalid_range", f"a request covers at most {MAX_RANGE.days} days",
                       [{"loc": ["query", "from"], "msg": f"at most {MAX_RANGE.days} days before 'to'",
                         "type": "value_error"}])  # fmt: skip
    return start, end


def _query_hash(listing_id: int, kind: str | None, start: dt.datetime | None, end: dt.datetime | None) -> str:
    """The query's parameters as the client sent them (None: left to its default), which every page repeats."""
    ends = "|".join(v.isoformat() if v is not None else "default" for v in (start, end))
    return hashlib.sha256(f"{listing_id}|{kind}|{ends}".encode()).hexdigest()[:16]


def _ms(at: dt.datetime) -> int:
    return int(at.replace(tzinfo=dt.UTC).timestamp() * 1000)


def _encode_token(key: bytes, query: str, span: tuple[dt.datetime, dt.datetime], cursor: _Cursor) -> str:
    """A signed token for the next page: the query's parameters, the range the first page resolved them to
    (a default 'to' is "now", which moves: the next pages keep the first one's), and where to go on."""
    day, (at, event_id), inclusive = cursor
    payload = orjson.dumps({"q": query, "s": _ms(span[0]), "u": _ms(span[1]), "d": day.isoformat(), "t": _ms(at),
                            "e": str(event_id), "i": inclusive})  # fmt: skip
    return f"{_b64(payload)}.{_b64(_sign(key, payload))}"


def _sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _bad_token(why: str) -> ApiError:
    return ApiError(400, "invalid_page_token", f"page_token is not valid here: {why}",
                    [{"loc": ["query", "page_token"], "msg": why, "type": "value_error"}])  # fmt: skip


def _decode_token(key: bytes, token: str, query: str) -> tuple[tuple[dt.datetime, dt.datetime], _Cursor]:
    """The range and cursor a token holds: only one this API signed, for this very query, inside its range."""
    try:
        payload_text, signature_text = token.split(".")
        payload = _unb64(payload_text)
        signed = hmac.compare_digest(_sign(key, payload), _unb64(signature_text))
    except (binascii.Error, ValueError):
        raise _bad_token("it was not made by this API") from None
    if not signed:
        raise _bad_token("it was not made by this API")
    try:
        data = orjson.loads(payload)
        day = dt.date.fromisoformat(data["d"])
        at = dt.datetime.fromtimestamp(int(data["t"]) / 1000, dt.UTC)
        start = dt.datetime.fromtimestamp(int(data["s"]) / 1000, dt.UTC)
        end = dt.datetime.fromtimestamp(int(data["u"]) / 1000, dt.UTC)
        cursor = (day, (at, UUID(data["e"])), bool(data["i"]))
        same_query = data["q"] == query
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError):
        raise _bad_token("it was not made by this API") from None
    if not same_query:
        raise _bad_token("it belongs to a query with other parameters")
    # Signed tokens are ours, but a cursor outside the query's range would send the scan elsewhere.
    if not (start.date() <= day <= end.date() and start - dt.timedelta(days=1) <= at <= end):
        raise _bad_token("it points outside the query's range")
    return (start, end), cursor


@router.get(
    "/{listing_id}/events",
    response_model=EventsPage,
    responses=PAGE_ERRORS,
    summary="A listing's events in time order, paged",
    operation_id="listListingEvents",
    dependencies=[RATE_LIMITED],
)
async def listing_events(
    listing_id: ListingId,
    store: StoreDep,
    resources: ResourcesDep,
    type: Annotated[Literal[TYPE_NAMES] | None, Query(description="Only events of this type")] = None,  # type: ignore[valid-type]
    from_: Annotated[ReadInstant | None, Query(alias="from", description="Inclusive; default: 'to' - 7 days")] = None,
    to: Annotated[ReadInstant | None, Query(description="Exclusive; default: now")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    page_token: Annotated[str | None, Query(max_length=512, description="From the previous page")] = None,
) -> JSONResponse:
    query = _query_hash(listing_id, type, from_, to)
    key = resources.page_token_key
    if page_token:
        (start, end), (day, position, inclusive) = _decode_token(key, page_token, query)
    else:
        start, end = _range(from_, to)
        day, position, inclusive = start.date(), (start, ZERO), True
    out: list[dict[str, Any]] = []
    positions: list[_Cursor] = []
    # One row more than asked for tells whether there is a next page (so the last page has no token).
    wanted = limit + 1
    # Over-fetch when filtering by type: rows of the other type are skipped in the app.
    fetch = wanted if type is None else min(1001, wanted * 4)
    scanned = 0
    try:
        while day <= end.date() and len(out) < wanted and scanned < SCAN_BUDGET:
            day_end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
            upper = (min(end, day_end), ZERO)
            asked = min(fetch, SCAN_BUDGET - scanned)
            rows = await store.listing_day(listing_id, day, position, upper, asked, inclusive=inclusive)
            scanned += len(rows)
            for row in rows:
                position, inclusive = (row.occurred_at, row.event_id), False
                if type is None or row.type == type:
                    out.append(row.as_json())
                    positions.append((day, position, False))
                    if len(out) == wanted:
                        break
            if len(rows) < asked and len(out) < wanted:
                # This day is exhausted: the next one starts at midnight, inclusive.
                day = day + dt.timedelta(days=1)
                position, inclusive = (dt.datetime.combine(day, dt.time(), dt.UTC), ZERO), True
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed read is the store's fault, not the caller's
        raise store_read_failed(exc) from None
    if len(out) > limit:
        token: str | None = _encode_token(key, query, (start, end), positions[limit - 1])
    elif len(out) < wanted and day <= end.date():
        # The scan budget ran out first (a type filter skipping many rows): a short page, and where to go on.
        token = _encode_token(key, query, (start, end), (day, position, inclusive))
    else:
        token = None
    return JSONResponse({"events": out[:limit], "next_page_token": token})


@router.get(
    "/{listing_id}/stats",
    response_model=Stats,
    responses=READ_ERRORS,
    summary="Events of a listing per type and UTC day (exact: rows are counted, never counters)",
    operation_id="getListingStats",
)
async def listing_stats(
    request: Request,
    listing_id: ListingId,
    store: StoreDep,
    resources: ResourcesDep,
    from_: Annotated[ReadDay | None, Query(alias="from", description="First day (UTC); default: 'to' - 6")] = None,
    to: Annotated[ReadDay | None, Query(description="Last day (UTC), inclusive; default: today")] = None,
) -> JSONResponse:
    last = to or dt.datetime.now(dt.UTC).date()
    first = from_ or max(EARLIEST.date(), last - dt.timedelta(days=6))
    if first > last or (last - first) >= MAX_RANGE:
        raise ApiError(422, "invalid_range", f"'from' must not be after 'to', and at most {MAX_RANGE.days} days",
                       [{"loc": ["query", "from"], "msg": "invalid range", "type": "value_error"}])  # fmt: skip
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    # What it costs is what it scans: each (day, type) is one count over that day's partition, paid before
    # reading; the rows those counts scanned (every row of each partition, once per type) after.
    charge(request, len(days) * len(TYPE_NAMES))
    try:
        counts = await _count_days(store, listing_id, days)
    except Exception as exc:  # noqa: BLE001
        raise store_read_failed(exc) from None
    scanned = len(TYPE_NAMES) * sum(sum(row) for row in counts)
    resources.limiter.debit(request.state.key_id, scanned // ROWS_PER_UNIT)
    per_day = [
        {"day": day.isoformat(), **dict(zip(STATS_KEYS, row, strict=True))}
        for day, row in zip(days, counts, strict=True)
    ]
    totals = {key: sum(row[i] for row in counts) for i, key in enumerate(STATS_KEYS)}
    return JSONResponse({"listing_id": listing_id, "days": per_day, **totals})


async def _count_days(store: Store, listing_id: int, days: list[dt.date]) -> list[tuple[int, ...]]:
    """Per day, the count of each declared type, in registry order (one count query per type and day)."""
    gate = asyncio.Semaphore(32)  # a 92-day range is 92 counts per type: keep a bounded number in flight

    async def count(day: dt.date, kind: str) -> int:
        async with gate:
            return await store.count_day(listing_id, day, kind)

    per_type = await asyncio.gather(*(asyncio.gather(*(count(day, kind) for day in days)) for kind in TYPE_NAMES))
    return list(zip(*per_type, strict=True))

"""Ingest (``POST /v1/events``, ``POST /v1/events/batch``) and read-back (``GET /v1/events/{id}``)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import orjson
from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, create_model

from api.body import read_json
from api.deps import AUTHORIZED, QUEUE_HAS_ROOM, RATE_LIMITED, PublisherDep, ResourcesDep, SettingsDep, StoreDep, charge
from api.errors import ApiError, ErrorBody, store_read_failed
from api.publisher import Overloaded, PublishError
from api.responses import JSONResponse
from sluice import keys
from sluice.events import Event, FieldError, event_id_of, fingerprint, iso_utc_ms, time_range, validate_queued
from sluice.eventtypes import REGISTRY, TYPE_NAMES
from sluice.marks import CONFLICT, NEW, parse_mark
from sluice.metrics import ACCEPTED_BY_TYPE, REJECTED_BY_TYPE, TALLY
from sluice.settings import Settings

router = APIRouter(prefix="/v1", tags=["events"], dependencies=[AUTHORIZED])


class EventResult(BaseModel):
    index: int
    event_id: str | None
    status: Literal["accepted", "rejected"]
    errors: list[FieldError] = []


class IngestResponse(BaseModel):
    """What a 202 answers: every accepted event is in the queue (written to Redis), not only in memory."""

    accepted: int
    rejected: int
    results: list[EventResult]


class BatchRequest(BaseModel):
    events: list[Event] = Field(min_length=1, max_length=1000)


#: An event as stored and read back (sluice.cassandra.StoredEvent.as_json): the fields every event has, and
#: those of its type; the schema lists every declared type's fields, each optional.
if TYPE_CHECKING:
    StoredEventOut = BaseModel
else:
    StoredEventOut = create_model(
        "StoredEventOut",
        event_id=(UUID, ...),
        type=(Literal[TYPE_NAMES], ...),
        listing_id=(int, ...),
        user_id=(int, ...),
        occurred_at=(str, Field(description="UTC, millisecond precision, as stored")),
        **{f.name: (f.kind.json_type | None, None) for kind in REGISTRY for f in kind.fields},
        accepted_at=(str | None, Field(default=None, description="When the API acknowledged the event (UTC)")),
    )


class EventLocation(BaseModel):
    """Where an event is: ``stored`` (with the event as written), ``queued``, or ``dead_lettered``."""

    event_id: UUID
    status: Literal["stored", "queued", "dead_lettered"]
    event: StoredEventOut | None = Field(default=None, description="The event as stored (status 'stored')")
    write_time: str | None = Field(
        default=None,
        description="Cassandra's write time of the stored cells: derived from occurred_at, so that rewrites "
        "after a redelivery are identical (see docs/guarantees.md)",
    )
    accepted_at: str | None = Field(default=None, description="When the API acknowledged it (status 'queued')")
    reason: str | None = Field(default=None, description="Why the worker gave up on it (status 'dead_lettered')")
    failed_at: str | None = None
    attempts: int | None = None


def _errors(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": description}}


AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    **_errors(401, "No valid API key (Authorization: Bearer <key>)."),
    **_errors(429, "Over the API key's rate limit; retry after Retry-After seconds."),
}

INGEST_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    **_errors(
        400,
        "The body is not valid JSON (malformed_json), has a duplicate key (duplicate_key), or is "
        "corrupt gzip (malformed_gzip).",
    ),
    **_errors(413, "The body, or its gzip-decompressed form, is larger than SLUICE_MAX_BODY_BYTES (1 MiB by default)."),
    **_errors(
        415,
        "The body is not JSON (Content-Type must be application/json), or its Content-Encoding is "
        "neither gzip nor identity (unsupported_content_encoding).",
    ),
    **_errors(409, "The event_id is already queued with other content (first write wins); nothing was queued."),
    **_errors(422, "No event is valid; details give the path of each bad field."),
    **_errors(
        503,
        "The queue is full or unavailable, or the API is overloaded; nothing was queued. Retry after "
        "Retry-After seconds.",
    ),
    **_errors(504, "Redis did not confirm in time: the events may or may not be queued. Retry them (same ids)."),
}


def _body_schema(ref: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }
    }


def _batch_error(code: str, message: str, loc: list[str | int], kind: str, msg: str) -> ApiError:
    return ApiError(422, code, message, [{"loc": loc, "msg": msg, "type": kind}])


def _count_rejected(raw: Any) -> None:
    kind = raw.get("type") if isinstance(raw, dict) else None
    REJECTED_BY_TYPE[kind if kind in TYPE_NAMES else "unknown"].inc()


def conflict_error(loc: list[str | int], event_id: str) -> dict[str, Any]:
    return {"loc": loc, "type": "conflict",
            "msg": f"event {event_id} is already queued with other content; the first version wins"}  # fmt: skip


async def queue_events(publisher: PublisherDep, queued: list[dict[str, Any]]) -> list[str]:
    """Queue the events (in their queued form) with their marks; one status per event (NEW, DUPLICATE or
    CONFLICT). The one publish path of every ingest route (native and SDK) but the single-event lane's
    (api/ingest.py, which uses the pieces below): 503 or 504 as an :class:`ApiError` when nothing, or maybe
    nothing, was queued."""
    fingerprints = [fingerprint(item) for item in queued]
    try:
        statuses = await publisher.submit(queued, fingerprints, correlation_id.get() or uuid.uuid4().hex)
    except (Overloaded, PublishError) as exc:
        raise publish_refused(exc) from None
    count_accepted(queued, statuses)
    return statuses


def publish_refused(exc: Overloaded | PublishError) -> ApiError:
    """What a client hears when its events were not queued (503) or may not have been (504)."""
    if isinstance(exc, Overloaded):
        return ApiError(503, "overloaded", f"{exc}; nothing was queued", headers={"Retry-After": "1"})
    if exc.definite:
        return ApiError(503, "queue_unavailable", f"{exc}; nothing was queued", headers={"Retry-After": "1"})
    return ApiError(
        504, "queue_timeout", f"{exc}; the events may or may not be queued: retry with the same event ids",
        headers={"Retry-After": "1"},
    )  # fmt: skip


def count_accepted(queued: list[dict[str, Any]], statuses: list[str]) -> None:
    """Count the newly queued events by type."""
    if len(queued) == 1:  # a single event: no Counter
        if statuses[0] == NEW:
            TALLY.inc(ACCEPTED_BY_TYPE[queued[0]["type"]])
        return
    accepted = Counter(event["type"] for event, status in zip(queued, statuses, strict=True) if status == NEW)
    for kind, count in accepted.items():
        TALLY.inc(ACCEPTED_BY_TYPE[kind], count)  # a validated event's type is a declared one


def single_event(raw: Any, settings: Settings) -> dict[str, Any]:
    """A single event's queued form; 422 with what is wrong with it."""
    event = validate_queued(raw, max_future_s=settings.max_clock_skew_s, retention_days=settings.retention_days)
    if isinstance(event, list):
        _count_rejected(raw)
        raise ApiError(422, "invalid_event", "the event is invalid", [e.model_dump() for e in event])
    return event


def single_answer(event_id: str, status: str) -> JSONResponse:
    """The 202 for a single event queued (or already queued with this content); an :class:`ApiError` (409) if
    another version of it is queued."""
    if status == CONFLICT:
        raise ApiError(409, "conflict", f"event {event_id} is already queued with other content; the first "
                       "version wins and nothing was queued", [conflict_error(["event_id"], event_id)])  # fmt: skip
    result = {"index": 0, "event_id": event_id, "status": "accepted", "errors": []}
    return JSONResponse({"accepted": 1, "rejected": 0, "results": [result]}, status_code=202)


@router.post(
    "/events",
    status_code=202,
    response_model=IngestResponse,
    responses=INGEST_ERRORS,
    openapi_extra=_body_schema("Event"),
    dependencies=[QUEUE_HAS_ROOM],
    summary="Ingest one event",
    operation_id="postEvent",
)
async def post_event(request: Request, settings: SettingsDep, publisher: PublisherDep) -> JSONResponse:
    # The ingest lane (api/ingest.py, FastIngest.start_single) answers most single events with the same steps,
    # without a task: keep the two in step.
    raw = await read_json(request, settings.max_body_bytes)
    charge(request, 1)
    event = single_event(raw, settings)
    [status] = await queue_events(publisher, [event])
    return single_answer(event["event_id"], status)


@router.post(
    "/events/batch",
    status_code=202,
    response_model=IngestResponse,
    responses=INGEST_ERRORS,
    openapi_extra=_body_schema("BatchRequest"),
    dependencies=[QUEUE_HAS_ROOM],
    summary="Ingest up to 1,000 events; each is judged on its own",
    operation_id="postEventBatch",
)
async def post_batch(request: Request, settings: SettingsDep, publisher: PublisherDep) -> JSONResponse:
    raw = await read_json(request, settings.max_body_bytes)
    if not isinstance(raw, dict):
        raise _batch_error("invalid_batch", 'the body must be an object: {"events": [...]}', [], "dict_type",
                           "Input should be an object")  # fmt: skip
    for key in raw:
        if key != "events":
            raise _batch_error("invalid_batch", "the batch has an unknown field", [key], "extra_forbidden",
                               "Extra inputs are not permitted")  # fmt: skip
    items = raw.get("events")
    if not isinstance(items, list):
        raise _batch_error("invalid_batch", '"events" must be an array of events', ["events"], "list_type",
                           "Input should be a valid list")  # fmt: skip
    if not items:
        raise _batch_error("empty_batch", "the batch holds no events", ["events"], "too_short",
                           "List should have at least 1 item")  # fmt: skip
    limit = settings.max_batch_events
    if len(items) > limit:
        raise _batch_error("batch_too_large", f"a batch holds at most {limit} events", ["events"], "too_long",
                           f"List should have at most {limit} items, not {len(items)}")  # fmt: skip
    charge(request, len(items))

    valid: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    all_errors: list[dict[str, Any]] = []
    context = time_range(settings.max_clock_skew_s, settings.retention_days)
    for index, item in enumerate(items):
        outcome = validate_queued(item, ("events", index), context=context)
        if isinstance(outcome, list):
            _count_rejected(item)
            errors = [e.model_dump() for e in outcome]
            all_errors += errors
            results.append({"index": index, "event_id": event_id_of(item), "status": "rejected", "errors": errors})
        else:
            valid.append(outcome)
            results.append({"index": index, "event_id": outcome["event_id"], "status": "accepted", "errors": []})
    if not valid:
        raise ApiError(422, "invalid_events", "no event in the batch is valid", all_errors)
    statuses = iter(await queue_events(publisher, valid))
    conflicts: list[dict[str, Any]] = []
    for result in results:
        if result["status"] == "accepted" and next(statuses) == CONFLICT:
            error = conflict_error(["events", result["index"], "event_id"], result["event_id"])
            result.update(status="rejected", errors=[error])
            conflicts.append(error)
    accepted = sum(1 for result in results if result["status"] == "accepted")
    if not accepted:
        code, status = ("conflict", 409) if conflicts else ("invalid_events", 422)
        raise ApiError(status, code, "no event in the batch was queued", all_errors + conflicts)
    return JSONResponse({"accepted": accepted, "rejected": len(items) - accepted, "results": results}, status_code=202)


@router.get(
    "/events/{event_id}",
    response_model=EventLocation,
    dependencies=[RATE_LIMITED],
    responses={
        **AUTH_ERRORS,
        **_errors(404, "No event with this id is stored (yet)."),
        **_errors(422, "The event id is not a UUID."),
        **_errors(503, "Cassandra is unreachable."),
    },
    summary="Where one event is: stored (as written), queued, or dead-lettered",
    operation_id="getEvent",
)
async def get_event(event_id: UUID, store: StoreDep, resources: ResourcesDep) -> JSONResponse:
    try:
        stored = await store.get_event(event_id)
        written = await store.write_time(event_id) if stored is not None else None
    except Exception as exc:  # noqa: BLE001 - a failed read is the store's fault, not the caller's
        raise store_read_failed(exc) from None
    if stored is not None:
        return JSONResponse({
            "event_id": str(event_id), "status": "stored", "event": stored.as_json(),
            "write_time": written.isoformat(timespec="milliseconds").replace("+00:00", "Z") if written else None,
        })  # fmt: skip
    # Not in Cassandra (yet): dead-lettered, or still queued (the API marks what it queued; workers clear it).
    async with resources.redis.pipeline(transaction=False) as pipe:
        pipe.hget(keys.DEAD_LETTERS, str(event_id))
        pipe.hget(keys.QUEUED, str(event_id))
        dead, queued = await pipe.execute()
    if dead is not None:
        record = orjson.loads(dead)
        return JSONResponse({
            "event_id": str(event_id), "status": "dead_lettered", "reason": record.get("reason"),
            "failed_at": record.get("failed_at"), "attempts": record.get("attempts"),
        })  # fmt: skip
    if queued is not None:
        accepted = dt.datetime.fromtimestamp(parse_mark(queued).accepted_at, dt.UTC)
        return JSONResponse({"event_id": str(event_id), "status": "queued", "accepted_at": iso_utc_ms(accepted)})
    raise ApiError(404, "not_found", f"no event {event_id} is stored, queued or dead-lettered")

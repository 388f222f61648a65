"""The analytics SDKs' routes: Segment's and RudderStack's wire format (``/v1/batch``, ``/v1/track``, ...) and
PostHog's (``/batch/``), so that existing SDKs send to Sluice unchanged.

What the SDKs need, read from their code: exactly **200** for success (RudderStack's and PostHog's SDKs retry
a 202, resending whole batches), and never a 4xx for a batch because one message in it is bad (all three drop
a batch for good on 400/413/422). So every message gets its own verdict in the 200 body; what cannot be mapped
to an event is kept as a dead letter (sluice/deadletters.py) before the answer, and counted in /metrics.
Error bodies carry ``code`` and ``message`` at the top level (api/errors.py). The translation is
sluice/sdkmap.py; the publish is the native routes' own (:func:`api.routes.events.queue_events`), with the
same marks, first-write-wins and promise: a 200 stands only once every accepted event is in Redis.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any, Literal

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from api.body import read_json
from api.deps import QUEUE_HAS_ROOM, PublisherDep, ResourcesDep, authorize_sdk, charge, sdk_header_key
from api.errors import ApiError, ErrorInfo
from api.responses import JSONResponse
from api.routes.events import AUTH_ERRORS, INGEST_ERRORS, conflict_error, queue_events
from sluice import deadletters, sdkmap
from sluice.events import FieldError
from sluice.eventtypes import SDK_COMMON_SOURCES
from sluice.marks import CONFLICT
from sluice.metrics import REJECTED_BY_TYPE, SDK_MESSAGES, SDK_REJECTED, sdk_name_label


async def _sdk_errors(request: Request) -> None:
    # First of the routes' dependencies: from here on every error body has top-level code and message.
    request.state.sdk = True


router = APIRouter(tags=["analytics SDKs"], dependencies=[Depends(_sdk_errors), QUEUE_HAS_ROOM])


class SdkResult(BaseModel):
    index: int
    status: Literal["accepted", "rejected"]
    #: Sluice's id of the event (the messageId / uuid, or the UUID derived from it).
    event_id: str | None
    message_id: str | None
    #: The event type it is stored as; null when accepted but not stored (identify, group, alias: counted).
    type: str | None
    errors: list[FieldError] = []


class SdkResponse(BaseModel):
    """A 200: every message's verdict. Accepted events are in Redis with their marks; rejected messages are
    kept as dead letters (kind ``sdk_unmapped``), replayable once a mapping exists."""

    success: bool
    accepted: int
    rejected: int
    results: list[SdkResult]


class SdkErrorBody(BaseModel):
    code: str
    message: str
    error: ErrorInfo


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {**spec, "model": SdkErrorBody}
    for status, spec in (INGEST_ERRORS | AUTH_ERRORS).items()
    if status not in (409, 422)  # per message, in the 200
} | {
    401: {"model": SdkErrorBody, "description": "No valid API key (Basic with the key as user name, Bearer, or "
          "writeKey / api_key in the body)."},
    400: {"model": SdkErrorBody, "description": "The body is not JSON, corrupt gzip, or not a batch "
          "(invalid_batch); nothing was queued."},
    413: {"model": SdkErrorBody, "description": "The body is over SLUICE_SDK_MAX_BODY_BYTES (6 MiB), "
          "compressed or inflated, or holds more than SLUICE_SDK_MAX_BATCH_EVENTS messages."},
}  # fmt: skip


def _invalid_batch(message: str) -> ApiError:
    return ApiError(400, "invalid_batch", message)


async def _ingest(
    request: Request, resources: ResourcesDep, publisher: PublisherDep, fmt: sdkmap.Format, call: str | None
) -> JSONResponse:
    """One SDK request: ``call`` is the message type of a single-message route (``/v1/track``), else a batch."""
    received_at = dt.datetime.now(dt.UTC)
    header_key = sdk_header_key(request)  # a bad header is refused before the body is read
    settings = resources.settings
    body = await read_json(request, settings.sdk_max_body_bytes)
    if not isinstance(body, dict):
        raise _invalid_batch("the body must be a JSON object")
    key_id = authorize_sdk(request, header_key, body.get("writeKey" if fmt == "segment" else "api_key"))
    if call is None:
        messages = body.get("batch")
        if not isinstance(messages, list):
            raise _invalid_batch('the body must be {"batch": [message, ...]}')
        prefix: tuple[str | int, ...] = ("batch",)
    else:
        messages = [body | {"type": call}]  # the route names the call, as Segment's own API does
        prefix = ()
    limit = settings.sdk_max_batch_events
    if len(messages) > limit:
        raise ApiError(413, "batch_too_large", f"a batch holds at most {limit} messages, not {len(messages)}")
    charge(request, max(1, len(messages)))

    context = sdkmap.Request(fmt, key_id, received_at, body.get("sentAt" if fmt == "segment" else "sent_at"))
    messages = [_without_secrets(msg) for msg in messages]
    outcomes = [
        sdkmap.translate(msg, context, resources.sdk_mapping, (*prefix, i) if call is None else (),
                         max_future_s=settings.max_clock_skew_s, retention_days=settings.retention_days)
        for i, msg in enumerate(messages)
    ]  # fmt: skip
    rejected = [
        deadletters.SdkRejection(str(o.event_id), messages[i], _reason(o), context)
        for i, o in enumerate(outcomes)
        if o.status == "rejected"
    ]
    if rejected:
        # Kept before the answer: a 200 must never stand for a rejected message that is nowhere.
        try:
            await deadletters.add_sdk_rejections(resources.redis, rejected)
        except (aioredis.RedisError, OSError) as exc:
            raise ApiError(503, "queue_unavailable", f"could not keep the rejected messages ({exc}); nothing "
                           "was queued", headers={"Retry-After": "1"}) from None  # fmt: skip
    events = [o.event for o in outcomes if o.event is not None]
    statuses = iter(await queue_events(publisher, events) if events else [])
    id_path = SDK_COMMON_SOURCES[fmt]["event_id"]
    for index, outcome in enumerate(outcomes):
        if outcome.event is not None and next(statuses) == CONFLICT:
            loc: list[str | int] = [*prefix, index, id_path] if call is None else [id_path]
            outcome.status, outcome.reason = "rejected", "conflict"
            outcome.errors = [FieldError.model_validate(conflict_error(loc, str(outcome.event_id)))]
    _count(key_id, fmt, outcomes)
    return JSONResponse(_answer(outcomes))


def _without_secrets(msg: Any) -> Any:
    # A single-message body carries the write key (and the request's sentAt): neither is part of the message,
    # and the key must never land in a dead letter.
    if isinstance(msg, dict) and ("writeKey" in msg or "api_key" in msg):
        return {k: v for k, v in msg.items() if k not in ("writeKey", "api_key")}
    return msg


def _reason(outcome: sdkmap.Outcome) -> str:
    return "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in outcome.errors)


def _count(key_id: str, fmt: str, outcomes: list[sdkmap.Outcome]) -> None:
    messages = Counter((o.call, o.status) for o in outcomes)
    for (call, status), n in messages.items():
        SDK_MESSAGES.labels(key_id, fmt, call, status).inc(n)
    rejections = Counter((sdk_name_label(o.name), o.reason) for o in outcomes if o.status == "rejected")
    for (name, reason), n in rejections.items():
        SDK_REJECTED.labels(key_id, name, reason).inc(n)
    for o in outcomes:
        if o.status == "rejected":
            REJECTED_BY_TYPE[o.kind or "unknown"].inc()


def _answer(outcomes: list[sdkmap.Outcome]) -> dict[str, Any]:
    results = [
        {"index": i, "status": "rejected" if o.status == "rejected" else "accepted", "event_id": o.event_id,
         "message_id": o.message_id, "type": _stored_type(o), "errors": [e.model_dump() for e in o.errors]}
        for i, o in enumerate(outcomes)
    ]  # fmt: skip
    rejected = sum(1 for o in outcomes if o.status == "rejected")
    return {"success": True, "accepted": len(outcomes) - rejected, "rejected": rejected, "results": results}


def _stored_type(outcome: sdkmap.Outcome) -> str | None:
    return outcome.kind if outcome.status == "accepted" else None


_OBJECT = {"type": "object"}


def _route(
    path: str, operation_id: str, fmt: sdkmap.Format, call: str | None, summary: str, *, in_schema: bool = True
) -> None:
    async def endpoint(request: Request, resources: ResourcesDep, publisher: PublisherDep) -> JSONResponse:
        return await _ingest(request, resources, publisher, fmt, call)

    router.add_api_route(
        path, endpoint, methods=["POST"], status_code=200, response_model=SdkResponse, responses=_ERRORS,
        summary=summary, include_in_schema=in_schema,
        operation_id=operation_id,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _OBJECT}}}},
    )  # fmt: skip


_route("/v1/batch", "postSegmentBatch", "segment", None, "Segment / RudderStack batch: each message gets its verdict")
_route("/v1/import", "postSegmentImport", "segment", None, "Segment's import (older mobile SDKs): as /v1/batch")
for _call in (*sdkmap.NAMED_CALLS, *sorted(sdkmap.COUNTED_CALLS)):
    _route(f"/v1/{_call}", f"postSegment{_call.title()}", "segment", _call, f"One Segment / RudderStack {_call}")
_route("/batch/", "postPosthogBatch", "posthog", None, "PostHog batch (api_key in the body)")
_route("/batch", "postPosthogBatchNoSlash", "posthog", None, "PostHog batch, no trailing slash", in_schema=False)
